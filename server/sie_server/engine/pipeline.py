"""The one request pipeline every task runs through.

1. **Capacity**: a full queue, or one the request's items would not fit beside the admitted
   and reserved ones, refuses before any tokenizing is spent.
2. **Prepare** in the tokenizer pool: the capability's ``*_job`` tokenizes and returns a ``Job``
   (``inline``: on the loop itself, as ``finish`` in step 5; registry.py says when).
3. **Submit**: the job's groups are admitted whole or refused whole (``QueueFull``).
4. **Gather**: wait for every payload's future; the first error fails the request.
5. **Postprocess** in the worker pool: the job's ``finish`` turns raw outputs into the result.
6. **Timing**: total, queue (the longest wait of any payload), tokenization, inference (each
   batch the request rode in counted once) and postprocessing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sie_server.domain import Job, Timing
from sie_server.engine.executor import BatchExecutor
from sie_server.engine.openmp import serially

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Outcome(Generic[R]):
    result: R
    timing: Timing
    #: Tokens the model saw for the request.
    tokens: int


async def run_job(
    executor: BatchExecutor,
    make_job: Callable[[], Job[R]],
    *,
    deadline: float | None,
    prepare_pool: Executor,
    finish_pool: Executor,
    check: Callable[[Job[R]], None] | None = None,
    bulk: bool = False,
    items: int = 0,
    inline: bool = False,
) -> Outcome[R]:
    """Prepare (off the loop), ``check`` the prepared job (before any compute), submit, gather,
    finish (off the loop), time. ``items``: the request's items, reserved while it is
    prepared, so a request that cannot fit is refused before it is tokenized. ``inline``:
    prepare and finish on the loop, for a request too small to be worth the round trips to
    the pools (each costs a thread handoff both ways and a turn of the loop), with torch's
    operators serial there as on the pools' threads (openmp.py)."""
    started = time.perf_counter()
    with executor.preparing(items):
        job = await _step(prepare_pool, inline, make_job)
        prepared = time.perf_counter()
        if check is not None:
            check(job)
        admitted = executor.submit_groups(job.groups, deadline, bulk=bulk)
    futures = [item.future for group in admitted for item in group]
    gathered = await asyncio.gather(*futures, return_exceptions=True)
    for value in gathered:
        if isinstance(value, BaseException):
            raise value
    outputs: list[list[Any]] = []
    position = 0
    for group in admitted:
        outputs.append(list(gathered[position : position + len(group)]))
        position += len(group)
    inferred = time.perf_counter()

    result = await _step(finish_pool, inline, job.finish, outputs)
    done = time.perf_counter()
    work = [item for group in admitted for item in group]
    passes = {
        item.timing.batch_id: (item.timing.inference_started, item.timing.inference_ms)
        for item in work
    }
    inference_ms = covered_ms(passes.values())
    timing = Timing(
        total_ms=(done - started) * 1000.0,
        # Everything between admission and the last result that was not the request's own
        # forward passes: waiting in the queue, collation, batches of others running first.
        queue_ms=max(0.0, (inferred - prepared) * 1000.0 - inference_ms),
        tokenization_ms=(prepared - started) * 1000.0,
        inference_ms=inference_ms,
        postprocessing_ms=(done - inferred) * 1000.0,
    )
    return Outcome(result=result, timing=timing, tokens=job.tokens)


async def _step(pool: Executor, inline: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in ``pool``, or on the loop itself when ``inline``, with torch's
    operators serial there as on the pools' threads."""
    if inline:
        with serially():
            return work(*args)
    return await asyncio.get_running_loop().run_in_executor(pool, work, *args)


def covered_ms(passes: Iterable[tuple[float, float]]) -> float:
    """The time (ms) during which at least one of ``passes`` ((start in perf_counter seconds,
    duration in ms)) ran: passes side by side (compute_lane.py) count once, so the request's
    inference never exceeds its total."""
    spans = sorted((start, start + ms / 1000.0) for start, ms in passes)
    covered, reached = 0.0, -math.inf
    for start, end in spans:
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered * 1000.0
