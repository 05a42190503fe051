"""A real HTTP bridge in the test's event loop, in front of a real server (tests/server_utils)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import msgpack_numpy
from sie_bridge.app import RunningBridge, start_bridge
from sie_bridge.config import BridgeSettings

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


@dataclass
class BridgeHandle:
    bridge: RunningBridge
    session: aiohttp.ClientSession
    url: str


@asynccontextmanager
async def bridged(backend: str, **overrides: Any) -> AsyncIterator[BridgeHandle]:
    """A started bridge on 127.0.0.1:0 pointed at ``backend``, and an HTTP session to it."""
    settings = BridgeSettings(host="127.0.0.1", port=0, backend=backend, **overrides)
    bridge = await start_bridge(settings)
    url = f"http://127.0.0.1:{bridge.port}"
    try:
        async with aiohttp.ClientSession(url) as session:
            yield BridgeHandle(bridge, session, url)
    finally:
        await bridge.stop()


async def assert_serves_fake(http: BridgeHandle, model: str) -> None:
    """The bridge is ready and encodes through its backend: a fake model's 2-dim vector."""
    async with http.session.get("/readyz") as response:
        assert response.status == 200, await response.text()
    body = {"items": [{"text": "hello"}]}
    async with http.session.post(f"/v1/encode/{model}", json=body, headers=JSON_HEADERS) as r:
        assert r.status == 200, await r.text()
        assert len((await r.json())["items"][0]["dense"]["values"]) == 2


def unpack(body: bytes) -> Any:
    """A msgpack response decoded as the original SIE SDK does (msgpack-numpy's hook)."""
    return msgpack.unpackb(body, object_hook=msgpack_numpy.decode, raw=False)


def pack(value: Any) -> bytes:
    """A msgpack request body as the original SIE SDK builds it (msgpack-numpy patched in)."""
    return msgpack.packb(value, default=msgpack_numpy.encode, use_bin_type=True)
