"""SIGTERM on a server that has the bridge attached (a ``/ws/status`` client holding a status
stream open): the server exits within its drain delay plus the work in flight, not the 30 s grace
period; the WebSocket stays open, says the backend is unavailable, and relays real status again
once a server is back on the same port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sie_bridge.app import start_bridge
from sie_bridge.config import BridgeSettings

from tests.bridge_utils import bridged
from tests.server_utils import fake_entry, free_port, serving, write_catalog_entry

ROOT = Path(__file__).resolve().parents[2]
MODEL = "fake/shutdown"
GRACE_S = 30.0
EXIT_GUARD_S = 10.0  # well under the grace period: a bound, not a benchmark
START_GUARD_S = 120.0

pytestmark = pytest.mark.slow


async def start_server(catalog: Path, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sie_server", "--host", "127.0.0.1", "--port", str(port),
        "--models-dir", str(catalog), "--preload", MODEL,
        "--drain-delay-s", "0.2", "--grace-period-s", str(GRACE_S),
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def next_status(ws: aiohttp.ClientWebSocketResponse, want_backend: bool) -> dict[str, Any]:
    """The next message that is (or, with ``want_backend=False``, is not) a real snapshot."""
    deadline = time.monotonic() + START_GUARD_S
    while time.monotonic() < deadline:
        message = json.loads(await ws.receive_str(timeout=START_GUARD_S))
        if ("models" in message) is want_backend:
            return dict(message)
    raise AssertionError("no such status message")


async def test_sigterm_with_a_relayed_status_stream_exits_promptly(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    port = free_port()
    server = await start_server(tmp_path / "catalog", port)
    restarted: asyncio.subprocess.Process | None = None
    try:
        async with (
            bridged(f"127.0.0.1:{port}") as http,
            http.session.ws_connect("/ws/status") as ws,
        ):
            first = await next_status(ws, want_backend=True)
            assert first["loaded_models"] == [MODEL]

            server.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(server.wait(), EXIT_GUARD_S)
            assert code == 0

            gone = await next_status(ws, want_backend=False)
            assert gone["backend"] == "unavailable"

            restarted = await start_server(tmp_path / "catalog", port)
            back = await next_status(ws, want_backend=True)
            assert back["server"]["pid"] == restarted.pid
            assert not ws.closed
    finally:
        for proc in (server, restarted):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_the_bridge_stops_promptly_with_a_status_socket_open(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    async with serving([tmp_path / "catalog"], [MODEL]) as server:
        settings = BridgeSettings(host="127.0.0.1", port=0, backend=server.address)
        bridge = await start_bridge(settings)
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{bridge.port}") as session,
            session.ws_connect("/ws/status") as ws,
        ):
            await next_status(ws, want_backend=True)
            # aiohttp would otherwise wait its whole shutdown timeout for the open socket.
            await asyncio.wait_for(bridge.stop(), EXIT_GUARD_S)
            closing = await ws.receive(timeout=EXIT_GUARD_S)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
