"""Shared pieces of the SDK client tests: every test runs each client over each transport.

The real server and bridge run in pytest-asyncio's one session loop, so a blocking
``SIEClient`` call made on that loop would deadlock it: ``Sdk.__call__`` runs sync-client calls
in a worker thread (``asyncio.to_thread``) and awaits async-client calls, so one test body holds
the same assertions for both clients. The ``case`` fixture is the 2 x 2 grid (transport x
client); each module builds its ``Sdk`` from its own server (gRPC address) and bridge (URL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import pytest
import pytest_asyncio
from sie_sdk import SIEAsyncClient, SIEClient

from tests.bridge_utils import BridgeHandle, bridged
from tests.server_utils import ServerHandle

TRANSPORTS = ("http", "grpc")
FLAVORS = ("sync", "async")


@dataclass(frozen=True, slots=True)
class Case:
    """One cell of the grid: which transport, which client."""

    transport: str
    flavor: str

    @property
    def id(self) -> str:
        return f"{self.transport}-{self.flavor}"

    def url(self, *, grpc_address: str, http_url: str) -> str:
        return http_url if self.transport == "http" else grpc_address


CASES = [Case(t, f) for t in TRANSPORTS for f in FLAVORS]


@dataclass(slots=True)
class Sdk:
    """A client of either flavor, called the same way from async tests."""

    client: SIEClient | SIEAsyncClient
    case: Case

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await call(self.client, method, *args, **kwargs)

    async def statuses(self, count: int, interval_ms: int = 100) -> list[dict[str, Any]]:
        """The first ``count`` messages of ``watch_status``; the stream is closed after."""
        if isinstance(self.client, SIEAsyncClient):
            stream = self.client.watch_status(interval_ms)
            try:
                return [message async for message in _take(stream, count)]
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        sync_client = self.client

        def first() -> list[dict[str, Any]]:
            sync_stream = sync_client.watch_status(interval_ms)
            try:
                return list(islice(sync_stream, count))
            finally:
                sync_stream.close()  # type: ignore[attr-defined]

        return await asyncio.to_thread(first)

    async def close(self) -> None:
        await call(self.client, "close")


async def call(client: SIEClient | SIEAsyncClient, method: str, *args: Any, **kwargs: Any) -> Any:
    """``client.<method>(*args, **kwargs)``: awaited, or run in a worker thread when sync."""
    function = getattr(client, method)
    if isinstance(client, SIEAsyncClient):
        return await function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)


async def _take(stream: Any, count: int) -> Any:
    taken = 0
    async for message in stream:
        yield message
        taken += 1
        if taken == count:
            return


def make_sdk(case: Case, url: str, **kwargs: Any) -> Sdk:
    """A client of ``case``'s flavor on ``url`` (whose form picks the transport)."""
    cls = SIEAsyncClient if case.flavor == "async" else SIEClient
    return Sdk(cls(url, **kwargs), case)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    value: Case = request.param
    return value


# Each module defines its own ``server`` (the models it needs); the bridge in front of it and
# the client of the case under test are the same for all of them.
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


@pytest_asyncio.fixture(loop_scope="session")
async def sdk(case: Case, server: ServerHandle, http: BridgeHandle) -> AsyncIterator[Sdk]:
    client = make_sdk(case, case.url(grpc_address=server.address, http_url=http.url))
    try:
        yield client
    finally:
        await client.close()
