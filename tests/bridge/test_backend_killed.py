"""SIGKILL of the server under the bridge, mid-request: the calls in flight and those sent while
it is gone get 503 BACKEND_UNAVAILABLE (never a 500 or a hang), the bridge keeps serving, and
once a server is back on the same address the bridge serves 200s again without a restart."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.bridge_utils import BridgeHandle, bridged
from tests.server_utils import (
    HANG_GUARD_S,
    eventually,
    fake_entry,
    free_port,
    start_server_process,
    write_catalog_entry,
)

MODEL = "fake/killed"
CLIENTS = 6
#: Bound on a server process starting (imports, preload) on a busy machine: a hang guard.
STARTUP_GUARD_S = 120.0
pytestmark = pytest.mark.slow


async def _ready(http: BridgeHandle) -> None:
    """Until the bridge's /readyz says the backend is SERVING (a hang guard bounds it)."""
    ready = False

    async def probe() -> None:
        nonlocal ready
        while not ready:
            async with http.session.get("/readyz") as r:
                ready = r.status == 200
            await asyncio.sleep(0.1)

    await asyncio.wait_for(probe(), STARTUP_GUARD_S)


async def test_sigkill_of_the_server_gives_503s_and_the_bridge_recovers(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    # Each batch takes 0.3 s, so calls are in flight when the signal lands.
    write_catalog_entry(catalog, fake_entry(MODEL, load_options={"delay_s": 0.3}))
    port = free_port()
    outcomes: list[tuple[str, int, str]] = []  # (phase, status, code)
    phase = "up"
    process = await start_server_process(catalog, port, MODEL)
    replacement: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()
    try:
        async with bridged(f"127.0.0.1:{port}", request_timeout_s=HANG_GUARD_S) as http:

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    body = {"items": [{"text": f"c{n} call {i}"}]}
                    sent_in = phase
                    async with http.session.post(f"/v1/encode/{MODEL}", json=body) as r:
                        detail = "" if r.status == 200 else (await r.json())["detail"]["code"]
                        outcomes.append((sent_in, r.status, detail))
                    i += 1
                    await asyncio.sleep(0.02)

            await _ready(http)
            clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
            await eventually(lambda: len(outcomes) >= 2 * CLIENTS, "traffic flows")
            phase = "killed"
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await eventually(
                lambda: sum(p == "killed" for p, _, _ in outcomes) >= 3 * CLIENTS,
                "calls answered while the server is gone",
            )
            async with http.session.get("/healthz") as r:
                assert r.status == 200  # the bridge itself is alive
            phase = "replaced"
            replacement = await start_server_process(catalog, port, MODEL)
            await _ready(http)
            await eventually(
                lambda: sum(p == "replaced" and s == 200 for p, s, _ in outcomes) >= 2 * CLIENTS,
                "the bridge serves again once a server is back",
            )
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), HANG_GUARD_S)
    finally:
        stop.set()
        for proc in (process, replacement):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
    statuses = {s for _, s, _ in outcomes}
    assert statuses <= {200, 503}, f"never a 500: {statuses}"
    killed = [(s, c) for p, s, c in outcomes if p == "killed"]
    # The calls in flight at the kill and those sent while the server was gone.
    assert killed.count((503, "BACKEND_UNAVAILABLE")) >= CLIENTS, killed
    assert {c for s, c in killed if s != 200} <= {"BACKEND_UNAVAILABLE"}
