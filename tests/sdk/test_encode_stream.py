"""``encode_stream`` on both clients over gRPC, against a server on the fake adapter: results in
input order, each item once, equal to the fake's expected vectors; the input read lazily (a
bounded number of batches ahead); a bad request reported in place without ending the stream; the
HTTP transport refusing clearly; a server restart resumed from the last acknowledged batch."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk import SIEAsyncClient, SIEClient
from sie_sdk.client._transports.grpc import AsyncGrpcTransport, GrpcTransport
from sie_sdk.client.errors import RequestError, SIEError
from sie_sdk.types import EncodeResult, Item

from tests.fakes import expected_vector
from tests.server_utils import (
    ServerHandle,
    fake_entry,
    free_port,
    serving,
    start_server_process,
    write_catalog_entry,
)

MODEL = "fake/sdk-stream"
MAX_LENGTH = 64
FLAVORS = ("sync", "async")
#: Bound on a server process starting (imports, preload) on a busy machine: a hang guard.
STARTUP_GUARD_S = 120.0


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdk-stream") / "catalog"
    write_catalog_entry(folder, fake_entry(MODEL))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog], preload=[MODEL]) as handle:
        yield handle


class CountingInput:
    """The input items, counting how many the client has read."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.read = 0

    def __iter__(self) -> Iterator[Item]:
        for item in self.items:
            self.read += 1
            yield item


async def stream(
    flavor: str, address: str, items: Any, check: Any = None, **kwargs: Any
) -> list[EncodeResult | SIEError]:
    """Every result of ``encode_stream`` on the ``flavor`` client; ``check(n)`` runs (and is
    awaited, for the async client, when it returns an awaitable) before the n-th result is
    taken. The sync client runs in a thread (the server is on this loop)."""
    if flavor == "async":
        async with SIEAsyncClient(address) as client:
            out: list[EncodeResult | SIEError] = []
            async for result in client.encode_stream(MODEL, items, **kwargs):
                if check is not None and inspect.isawaitable(pending := check(len(out))):
                    await pending
                out.append(result)
            return out

    def run() -> list[EncodeResult | SIEError]:
        with SIEClient(address) as client:
            results: list[EncodeResult | SIEError] = []
            for result in client.encode_stream(MODEL, items, **kwargs):
                if check is not None:
                    check(len(results))
                results.append(result)
            return results

    return await asyncio.to_thread(run)


def assert_results(results: list[EncodeResult | SIEError], texts: list[str]) -> None:
    assert len(results) == len(texts)
    for index, (result, text) in enumerate(zip(results, texts, strict=True)):
        assert not isinstance(result, SIEError), result
        assert result["id"] == f"item-{index}"
        np.testing.assert_array_equal(result["dense"], expected_vector(text, MAX_LENGTH))


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_long_stream_arrives_in_order_reading_the_input_lazily(
    flavor: str, server: ServerHandle
) -> None:
    count, batch_size, window = 100_000 if flavor == "sync" else 20_000, 250, 4
    texts = [f"short text {i}" for i in range(count)]
    source = CountingInput([{"text": t} for t in texts])
    ahead: list[int] = []

    def check(taken: int) -> None:
        ahead.append(source.read - taken)

    results = await stream(
        flavor, server.address, source, check, batch_size=batch_size, window=window
    )
    assert_results(results, texts)
    # At most 2 * window batches unanswered, plus the batch being handed out.
    assert max(ahead) <= (2 * window + 1) * batch_size
    assert source.read == count


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_bad_request_is_reported_in_place_and_the_stream_goes_on(
    flavor: str, server: ServerHandle
) -> None:
    texts = [f"text {i}" for i in range(1000)]
    items: list[Item] = [{"text": t} for t in texts]
    items[450] = {"id": "no text here"}  # refused by the server: its whole batch fails
    results = await stream(flavor, server.address, items, batch_size=100)
    assert len(results) == len(items)
    failed = [i for i, r in enumerate(results) if isinstance(r, SIEError)]
    assert failed == list(range(400, 500))
    error = results[450]
    assert isinstance(error, RequestError)
    assert error.code == "INVALID_INPUT"
    kept = [i for i in range(len(items)) if i not in failed]
    for index in kept:
        result = results[index]
        assert not isinstance(result, SIEError)
        assert result["id"] == f"item-{index}"
        np.testing.assert_array_equal(result["dense"], expected_vector(texts[index], MAX_LENGTH))


async def test_the_http_transport_refuses_to_stream() -> None:
    with SIEClient("http://127.0.0.1:9") as client:
        with pytest.raises(SIEError, match="gRPC transport") as refused:
            client.encode_stream(MODEL, [{"text": "x"}])
        assert refused.value.code == "STREAM_UNSUPPORTED"
    async with SIEAsyncClient("http://127.0.0.1:9") as async_client:
        with pytest.raises(SIEError, match="gRPC transport"):
            async_client.encode_stream(MODEL, [{"text": "x"}])


async def serving_process(catalog: Path, port: int) -> asyncio.subprocess.Process:
    """A server process on ``port``, returned once its health says SERVING."""
    process = await start_server_process(catalog, port, MODEL)
    deadline = time.monotonic() + STARTUP_GUARD_S
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process
            except grpc.aio.AioRpcError:
                pass
            assert process.returncode is None, "the server process exited"
            assert time.monotonic() < deadline, "the server never became SERVING"
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_server_restart_is_resumed_from_the_last_acknowledged_batch(
    flavor: str, catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = GrpcTransport if flavor == "sync" else AsyncGrpcTransport
    opened = count_streams(monkeypatch, transport)
    port = free_port()
    texts = [f"resumed text {i}" for i in range(3000)]
    # The consumer pauses at result 1000 while the server is killed and restarted.
    halfway, restarted = threading.Event(), threading.Event()
    async_restarted = asyncio.Event()

    def pause(taken: int) -> None:
        if taken == 1000:
            halfway.set()
            assert restarted.wait(STARTUP_GUARD_S), "the server was not restarted"

    async def async_pause(taken: int) -> None:
        if taken == 1000:
            halfway.set()
            await async_restarted.wait()

    process = await serving_process(catalog, port)
    try:
        consumer = asyncio.ensure_future(
            stream(
                flavor,
                f"127.0.0.1:{port}",
                [{"text": t} for t in texts],
                pause if flavor == "sync" else async_pause,
                batch_size=50,
                provision_timeout_s=STARTUP_GUARD_S,
                wait_for_capacity=True,
            )
        )
        await asyncio.to_thread(halfway.wait, STARTUP_GUARD_S)
        process.kill()
        await process.wait()
        process = await serving_process(catalog, port)
    finally:
        restarted.set()
        async_restarted.set()
    try:
        results = await consumer
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert_results(results, texts)
    assert len(opened) >= 2, "the stream was resumed on a new call"


def count_streams(monkeypatch: pytest.MonkeyPatch, transport: type[Any]) -> list[int]:
    """Record each stream ``transport`` opens (its window), by wrapping ``encode_stream``."""
    opened: list[int] = []
    original = transport.encode_stream

    def counted(self: Any, model: str, batches: Any, window: int, call: Any) -> Any:
        opened.append(window)
        return original(self, model, batches, window, call)

    monkeypatch.setattr(transport, "encode_stream", counted)
    return opened
