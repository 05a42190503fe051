"""Health while a compute lane is stuck: NOT_SERVING once one job (a forward pass, a warm-up, a
LoRA attach) has run for longer than ``--stuck-compute-s``, SERVING again when it returns.

A forward pass cannot be interrupted from Python: a pass that never returns (a deadlocked
kernel, a driver fault) holds its lane for good, and on the CPU every model shares one lane
(``engine/model_thread.py``). Requests behind it still end at their deadlines, but a load
balancer probing health would keep sending work to a server that computes nothing. So the
watch reports the lane's state through health, where orchestrators look (a readiness probe
takes the server out of rotation; a liveness probe restarts it), and logs which job holds which
lane, once when it is found stuck and once when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sie_server.engine.registry import ModelRegistry

log = logging.getLogger(__name__)


async def watch_compute(
    registry: ModelRegistry, limit_s: float, set_stuck: Callable[[bool], Awaitable[None]]
) -> None:
    """Until cancelled: every ``min(1 s, limit_s / 4)``, ``set_stuck(True)`` when a lane's job
    has run for more than ``limit_s``, ``set_stuck(False)`` when no lane's has any more."""
    poll_s = min(1.0, limit_s / 4)
    stuck: dict[str, str] = {}  # lane -> the job found stuck on it
    while True:
        await asyncio.sleep(poll_s)
        try:
            stuck = await _look(registry, limit_s, stuck, set_stuck)
        except Exception:  # the watch must outlive a bad poll: it is the server's alarm
            log.exception("compute watch: a poll failed")


async def _look(
    registry: ModelRegistry,
    limit_s: float,
    stuck: dict[str, str],
    set_stuck: Callable[[bool], Awaitable[None]],
) -> dict[str, str]:
    """One poll: log what became stuck or free, report a change, return what is stuck now."""
    now = time.monotonic()
    found = {lane: what for lane, what, since in registry.busy_lanes() if now - since > limit_s}
    for lane, what in stuck.items():
        if found.get(lane) != what:
            log.warning("compute lane %s free again (%s returned)", lane, what)
    for lane, what in found.items():
        if stuck.get(lane) != what:
            log.error(
                "compute lane %s stuck: %s has run for more than %.0f s; health reports "
                "NOT_SERVING until it returns",
                lane,
                what,
                limit_s,
            )
    if bool(found) != bool(stuck):
        await set_stuck(bool(found))
    return found
