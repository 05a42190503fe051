"""``encode_stream`` on both clients, against a server on the fake adapter: over gRPC, results in
input order, each item once, equal to the fake's expected vectors; the input read lazily (a
bounded number of batches ahead); a bad request reported in place without ending the stream; a
server restart resumed from the last acknowledged batch. Over HTTP (the bridge's NDJSON
endpoint, one POST of at most ``2 * window`` batches after another): every item equal to the
unary ``encode``'s, in every output dtype; bad batches reported in place, also as a POST's last
line; a batch JSON cannot carry refused in place; leaving early closes the POST. What a real
bridge rarely does (a POST that ends early, errors on a last line): test_encode_stream_http.py."""

from __future__ import annotations

import asyncio
import contextlib
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
from sie_sdk.client._transports.http import AsyncHttpTransport, HttpTransport
from sie_sdk.client.errors import RequestError, SIEError
from sie_sdk.types import EncodeResult, Item

from tests.bridge_utils import BridgeHandle, bridged
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
    executor = server.running.registry.entry(MODEL).executor
    assert executor is not None
    ahead: list[int] = []
    held: list[int] = []

    def check(taken: int) -> None:
        ahead.append(source.read - taken)
        held.append(executor.pending_items)

    results = await stream(
        flavor, server.address, source, check, batch_size=batch_size, window=window
    )
    assert_results(results, texts)
    # The client: at most 2 * window batches unanswered, plus the batch being handed out.
    assert max(ahead) <= (2 * window + 1) * batch_size
    assert source.read == count
    # The server: what it holds of the stream is bounded by the window, whatever its length.
    assert 0 < max(held) <= window * batch_size


class CountingAsyncInput:
    """``CountingInput`` as an async iterable (e.g. rows read from a database)."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[Item]:
        for item in self.items:
            await asyncio.sleep(0)  # a source that awaits between items
            self.read += 1
            yield item


async def test_the_async_client_reads_an_async_iterable_lazily(server: ServerHandle) -> None:
    count, batch_size, window = 3_000, 50, 2
    texts = [f"async source {i}" for i in range(count)]
    source = CountingAsyncInput([{"text": t} for t in texts])
    ahead: list[int] = []
    results = await stream(
        "async",
        server.address,
        source,
        lambda taken: ahead.append(source.read - taken),
        batch_size=batch_size,
        window=window,
    )
    assert_results(results, texts)
    assert source.read == count
    assert max(ahead) <= (2 * window + 1) * batch_size


async def test_the_sync_client_refuses_an_async_iterable(server: ServerHandle) -> None:
    with SIEClient(server.address) as client, pytest.raises(TypeError, match="SIEAsyncClient"):
        client.encode_stream(MODEL, CountingAsyncInput([{"text": "x"}]))


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


def assert_same(streamed: list[EncodeResult | SIEError], unary: list[EncodeResult]) -> None:
    """Each streamed result equals the unary one: id, counts, vectors (values and dtype)."""
    assert len(streamed) == len(unary)
    for result, expected in zip(streamed, unary, strict=True):
        assert not isinstance(result, SIEError), result
        assert {k: v for k, v in result.items() if k not in ("dense", "timing")} == {
            k: v for k, v in expected.items() if k not in ("dense", "timing")
        }
        assert result["dense"].dtype == expected["dense"].dtype
        np.testing.assert_array_equal(result["dense"], expected["dense"])


def count_posts(monkeypatch: pytest.MonkeyPatch, flavor: str) -> list[int]:
    """Record the number of batches each stream POST carries."""
    transport = HttpTransport if flavor == "sync" else AsyncHttpTransport
    sizes: list[int] = []
    original = transport._post

    def counted(self: Any, model: str, post: list[Any], window: int, call: Any) -> Any:
        sizes.append(len(post))
        return original(self, model, post, window, call)

    monkeypatch.setattr(transport, "_post", counted)
    return sizes


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_stream_over_http_equals_unary_encode_post_after_post(
    flavor: str, http: BridgeHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    count, batch_size, window = 2000, 50, 2
    texts = [f"http text {i} " + "word " * (i % 7) for i in range(count)]
    source = CountingInput([{"text": t} for t in texts])
    ahead: list[int] = []

    def check(taken: int) -> None:
        ahead.append(source.read - taken)

    posts = count_posts(monkeypatch, flavor)
    streamed = await stream(flavor, http.url, source, check, batch_size=batch_size, window=window)
    with SIEClient(http.url) as unary_client:
        unary = await asyncio.to_thread(unary_client.encode, MODEL, [{"text": t} for t in texts])
    assert isinstance(unary, list)
    assert_same(streamed, unary)
    assert_results(streamed, texts)
    # Every batch posted once, at most 2 * window a POST, so many POSTs.
    assert sum(posts) == count // batch_size
    assert max(posts) == 2 * window
    assert max(ahead) <= (2 * window + 1) * batch_size


@pytest.mark.parametrize("dtype", ["float16", "int8", "uint8", "binary"])
async def test_every_output_dtype_streams_over_http_as_unary_encode_gives_it(
    dtype: str, http: BridgeHandle
) -> None:
    # One or two words: the fake's vector ([tokens, sum of ids]) stays in float16's range.
    items: list[Item] = [{"text": f"dtype{i}" + " x" * (i % 2)} for i in range(30)]
    async with SIEAsyncClient(http.url) as client:
        streamed = [
            r async for r in client.encode_stream(MODEL, items, batch_size=7, output_dtype=dtype)
        ]
        unary = await client.encode(MODEL, items, output_dtype=dtype)
    assert isinstance(unary, list)
    assert_same(streamed, unary)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_bad_batches_over_http_are_reported_in_place_and_the_stream_goes_on(
    flavor: str, http: BridgeHandle
) -> None:
    texts = [f"text {i}" for i in range(1000)]
    items: list[Item] = [{"text": t} for t in texts]
    # Batches of 100, 8 a POST (window 4): the bad ones are batch 3 (mid-POST), batch 8 (the
    # first POST's last line) and batch 10 (the stream's last).
    for index in (250, 799, 900):
        items[index] = {"id": "no text here"}
    results = await stream(flavor, http.url, items, batch_size=100, window=4)
    assert len(results) == len(items)
    failed = [i for i, r in enumerate(results) if isinstance(r, SIEError)]
    assert failed == [*range(200, 300), *range(700, 800), *range(900, 1000)]
    for index in (250, 799, 900):
        error = results[index]
        assert isinstance(error, RequestError)
        assert error.code == "INVALID_INPUT"
    for index in set(range(len(items))) - set(failed):
        result = results[index]
        assert not isinstance(result, SIEError)
        assert result["id"] == f"item-{index}"
        np.testing.assert_array_equal(result["dense"], expected_vector(texts[index], MAX_LENGTH))


async def test_a_batch_json_cannot_carry_is_refused_in_place_over_http(http: BridgeHandle) -> None:
    items: list[Item] = [{"text": f"json {i}"} for i in range(30)]
    items[15] = {"text": "not a number", "metadata": {"score": float("nan")}}
    async with SIEAsyncClient(http.url) as client:
        results = [r async for r in client.encode_stream(MODEL, items, batch_size=10)]
    failed = [i for i, r in enumerate(results) if isinstance(r, SIEError)]
    assert failed == list(range(10, 20))
    error = results[15]
    assert isinstance(error, RequestError)
    assert error.code == "INVALID_INPUT"
    assert "JSON" in str(error)
    assert [r["id"] for r in results if not isinstance(r, SIEError)] == [
        f"item-{i}" for i in (*range(10), *range(20, 30))
    ]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_leaving_an_http_stream_early_closes_its_post_and_the_client_goes_on(
    flavor: str, http: BridgeHandle
) -> None:
    items: list[Item] = [{"text": f"early {i}"} for i in range(2000)]
    first: list[Any]
    if flavor == "async":
        async with SIEAsyncClient(http.url) as client:
            results = client.encode_stream(MODEL, items, batch_size=10)
            first = [await anext(results) for _ in range(5)]
            await results.aclose()  # type: ignore[attr-defined]
            after = await client.encode(MODEL, {"text": "after"})
    else:

        def run() -> tuple[list[Any], Any]:
            with SIEClient(http.url) as sync_client:
                sync_results = sync_client.encode_stream(MODEL, items, batch_size=10)
                taken = [next(sync_results) for _ in range(5)]
                sync_results.close()  # type: ignore[attr-defined]
                return taken, sync_client.encode(MODEL, {"text": "after"})

        first, after = await asyncio.to_thread(run)
    assert [r["id"] for r in first] == [f"item-{i}" for i in range(5)]
    assert not isinstance(after, list)
    np.testing.assert_array_equal(after["dense"], expected_vector("after", MAX_LENGTH))


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


#: The transport class each (transport, flavor) streams through.
TRANSPORT_CLASSES: dict[tuple[str, str], type[Any]] = {
    ("grpc", "sync"): GrpcTransport,
    ("grpc", "async"): AsyncGrpcTransport,
    ("http", "sync"): HttpTransport,
    ("http", "async"): AsyncHttpTransport,
}


@pytest.mark.slow
@pytest.mark.parametrize("over", ["grpc", "http"])
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_server_restart_is_resumed_from_the_last_acknowledged_batch(
    flavor: str, over: str, catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP the bridge stays up while the server behind it restarts."""
    opened = count_streams(monkeypatch, TRANSPORT_CLASSES[over, flavor])
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

    async with contextlib.AsyncExitStack() as stack:
        url = f"127.0.0.1:{port}"
        if over == "http":
            url = (await stack.enter_async_context(bridged(url))).url
        process = await serving_process(catalog, port)
        try:
            consumer = asyncio.ensure_future(
                stream(
                    flavor,
                    url,
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
    if over == "grpc":  # over HTTP the POST in flight may have been answered before the kill
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
