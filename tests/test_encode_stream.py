"""``EncodeService.EncodeStream`` end to end on the fake adapter: every request answered once, in
order, equal to the unary answer; bad requests answered as errors without ending the stream; the
window bounds the work admitted; cancelling frees the queued work; unary calls get served
meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.config import load_settings

from tests.fakes import FakeAdapter, expected_vector
from tests.server_utils import (
    CORRUPT,
    HANG_GUARD_S,
    ServerHandle,
    error_info,
    eventually,
    fake_adapter,
    fake_entry,
    fake_model_server,
    serving,
    write_catalog_entry,
)

MODEL = "fake/stream"
MAX_LENGTH = 64


def fake_server(tmp_path: Path, **overrides: Any) -> AbstractAsyncContextManager[ServerHandle]:
    return fake_model_server(tmp_path, MODEL, **overrides)


def adapter_of(handle: ServerHandle) -> FakeAdapter:
    return fake_adapter(handle, MODEL)


def queued_items(handle: ServerHandle) -> int:
    executor = handle.running.registry.entry(MODEL).executor
    assert executor is not None
    return executor.queued_items


def pending_items(handle: ServerHandle) -> int:
    executor = handle.running.registry.entry(MODEL).executor
    assert executor is not None
    return executor.pending_items


def request(texts: Sequence[str], model: str = MODEL) -> encode_pb2.EncodeRequest:
    return encode_pb2.EncodeRequest(
        model=model, items=[common_pb2.Item(id=f"id-{i}", text=t) for i, t in enumerate(texts)]
    )


def texts_of(sequence: int, count: int) -> list[str]:
    return [f"request {sequence} text {i}" for i in range(count)]


def messages(
    requests: Iterable[encode_pb2.EncodeRequest], window: int = 0
) -> Iterator[encode_pb2.EncodeStreamRequest]:
    """Stream messages numbered from 1; the first one carries ``window``."""
    for sequence, req in enumerate(requests, start=1):
        yield encode_pb2.EncodeStreamRequest(
            sequence=sequence, request=req, window=window if sequence == 1 else 0
        )


def results_only(response: encode_pb2.EncodeResponse) -> list[encode_pb2.EncodeResult]:
    """The per-item results (timing differs from call to call)."""
    return list(response.items)


def raw_stream(handle: ServerHandle) -> Any:
    """``EncodeStream`` taking serialized messages as they are (good or not)."""
    return handle.channel.stream_stream(
        "/sie.v1.EncodeService/EncodeStream",
        request_serializer=lambda data: data,
        response_deserializer=encode_pb2.EncodeStreamResponse.FromString,
    )


async def read_into(call: Any, received: list[encode_pb2.EncodeStreamResponse]) -> None:
    """Every answer of ``call`` into ``received``, then its status (raised when not OK)."""
    async for response in call:
        received.append(response)


def assert_encodes(response: encode_pb2.EncodeResponse, texts: Sequence[str]) -> None:
    assert [item.id for item in response.items] == [f"id-{i}" for i in range(len(texts))]
    for item, text in zip(response.items, texts, strict=True):
        np.testing.assert_array_equal(
            from_tensor(item.dense.values), expected_vector(text, MAX_LENGTH)
        )


async def test_many_requests_stream_through_in_order_and_equal_unary(tmp_path: Path) -> None:
    count, per_request = 2000, 50
    async with fake_server(tmp_path) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        requests = [request(texts_of(seq, per_request)) for seq in range(1, count + 1)]
        call = stub.EncodeStream(messages(requests, window=8))
        responses = [response async for response in call]
        assert [r.sequence for r in responses] == list(range(1, count + 1))
        assert all(r.WhichOneof("result") == "response" for r in responses)
        for sequence, response in enumerate(responses, start=1):
            assert_encodes(response.response, texts_of(sequence, per_request))
        # The unary call answers the same for the same request (a sample: the unary path is
        # the slow part of this test).
        for sequence in range(1, count + 1, 97):
            unary = await stub.Encode(requests[sequence - 1])
            assert results_only(unary) == results_only(responses[sequence - 1].response)
            assert unary.model == responses[sequence - 1].response.model == MODEL
        assert pending_items(handle) == 0


async def test_a_bad_request_is_answered_as_an_error_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    async with fake_server(tmp_path) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        good = [request(texts_of(seq, 3)) for seq in range(1, 21)]
        no_text = encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(id="empty")])
        unknown_model = request(["hello"], model="no/such-model")
        stream = [*good[:10], no_text, unknown_model, *good[10:]]
        sent = list(messages(stream, window=4))
        sent.insert(5, encode_pb2.EncodeStreamRequest(sequence=999))  # carries no request
        responses = [response async for response in stub.EncodeStream(iter(sent))]

        assert [r.sequence for r in responses] == [m.sequence for m in sent]
        by_sequence = {r.sequence: r for r in responses}
        errors = {r.sequence: r.error for r in responses if r.WhichOneof("result") == "error"}
        assert sorted(errors) == [11, 12, 999]

        assert errors[11].reason == "INVALID_INPUT"
        assert "text" in errors[11].message
        assert errors[12].reason == "MODEL_NOT_FOUND"
        assert "no/such-model" in errors[12].message
        assert errors[999].reason == "INVALID_INPUT"
        assert "no request" in errors[999].message
        # The same request sent unary fails with the same reason and message.
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Encode(no_text)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.details() == errors[11].message

        for index in range(len(good)):
            sequence = index + 1 if index < 10 else index + 3
            response = by_sequence[sequence]
            assert response.WhichOneof("result") == "response"
            assert_encodes(response.response, texts_of(index + 1, 3))
        # Each streamed request is counted once, like a unary call.
        assert streamed(handle, MODEL, "ok") == len(good)
        assert streamed(handle, MODEL, "INVALID_INPUT") == 1
        assert streamed(handle, "", "MODEL_NOT_FOUND") == 1


def streamed(handle: ServerHandle, model: str, status: str) -> int:
    """How many streamed requests on ``model`` the server answered with ``status``."""
    metrics = handle.running.registry.metrics
    return metrics.counter(
        "sie_requests_total", model=model, endpoint="encode_stream", status=status
    )


async def test_the_window_bounds_the_requests_admitted(tmp_path: Path) -> None:
    window, per_request, count = 3, 2, 12
    async with fake_server(tmp_path) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        adapter = adapter_of(handle)
        warmup = adapter.passes_started  # passes the load ran
        adapter.hold()
        try:
            requests = [request(texts_of(seq, per_request)) for seq in range(1, count + 1)]
            call = stub.EncodeStream(messages(requests, window=window))
            collected = asyncio.ensure_future(collect(call))
            await eventually(lambda: adapter.passes_started == warmup + 1, "the model is busy")
            await eventually(
                lambda: pending_items(handle) == window * per_request, "the window is admitted"
            )
            for _ in range(20):  # let the loop run: more would be admitted if the bound broke
                await asyncio.sleep(0.01)
                assert pending_items(handle) == window * per_request
            # The server is not full: a unary call is admitted beside the stream.
            unary = asyncio.ensure_future(stub.Encode(request(["interactive query"])))
            await eventually(
                lambda: pending_items(handle) == window * per_request + 1,
                "the unary call is admitted",
            )
        finally:
            adapter.release()
        responses = await collected
        assert [r.sequence for r in responses] == list(range(1, count + 1))
        assert_encodes((await unary), ["interactive query"])
        assert pending_items(handle) == 0


async def collect(
    call: grpc.aio.StreamStreamCall[
        encode_pb2.EncodeStreamRequest, encode_pb2.EncodeStreamResponse
    ],
) -> list[encode_pb2.EncodeStreamResponse]:
    return [response async for response in call]


async def test_cancelling_the_stream_frees_its_queued_work(tmp_path: Path) -> None:
    window, per_request = 4, 3
    async with fake_server(tmp_path) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        adapter = adapter_of(handle)
        warmup = adapter.passes_started  # passes the load ran
        adapter.hold()
        try:
            # A unary call holds the model, so every streamed item waits in the queue.
            first = asyncio.ensure_future(stub.Encode(request(["saturating first pass"])))
            await eventually(lambda: adapter.passes_started == warmup + 1, "the model is busy")
            requests = (request(texts_of(seq, per_request)) for seq in range(1, 10_000))
            call = stub.EncodeStream(messages(requests, window=window))
            await eventually(
                lambda: pending_items(handle) == 1 + window * per_request, "the window is queued"
            )
            call.cancel()
            await eventually(lambda: pending_items(handle) == 1, "the queued work is freed")
        finally:
            adapter.release()
        assert_encodes(await first, ["saturating first pass"])
        assert await call.code() == grpc.StatusCode.CANCELLED
        await eventually(lambda: pending_items(handle) == 0, "the executor is empty")
        ran = [p.texts for p in adapter.passes[warmup:]]
        assert ran == [("saturating first pass",)], "no streamed item ran"
        # The server serves on.
        assert_encodes(await stub.Encode(request(["after the cancel"])), ["after the cancel"])


async def test_queue_full_is_retried_by_the_server(tmp_path: Path) -> None:
    async with fake_server(tmp_path, max_pending_items=4) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        adapter = adapter_of(handle)
        warmup = adapter.passes_started  # passes the load ran
        adapter.hold()
        try:
            requests = [request(texts_of(seq, 3)) for seq in range(1, 5)]
            collected = asyncio.ensure_future(
                collect(stub.EncodeStream(messages(requests, window=4)))
            )
            await eventually(lambda: adapter.passes_started == warmup + 1, "the model is busy")
            # The first request fills the queue; the next ones are refused QUEUE_FULL for now.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Encode(request(["refused while full", "and this"]))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            adapter.release()
        responses = await collected
        assert [r.sequence for r in responses] == [1, 2, 3, 4]
        for sequence, response in enumerate(responses, start=1):
            assert response.WhichOneof("result") == "response", response.error
            assert_encodes(response.response, texts_of(sequence, 3))


async def test_a_loading_model_is_waited_for_not_answered_as_an_error(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL))
    async with serving([catalog]) as handle:  # not preloaded: the first request loads it
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        requests = [request(texts_of(seq, 2)) for seq in range(1, 4)]
        responses = await collect(stub.EncodeStream(messages(requests)))
        assert [r.sequence for r in responses] == [1, 2, 3]
        for sequence, response in enumerate(responses, start=1):
            assert response.WhichOneof("result") == "response", response.error
            assert_encodes(response.response, texts_of(sequence, 2))
        assert streamed(handle, MODEL, "ok") == 3


async def test_unary_calls_are_served_while_a_stream_runs(tmp_path: Path) -> None:
    count = 400
    async with fake_server(tmp_path) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        received: list[encode_pb2.EncodeStreamResponse] = []

        async def consume() -> None:
            requests = [request(texts_of(seq, 20)) for seq in range(1, count + 1)]
            async for response in stub.EncodeStream(messages(requests, window=4)):
                received.append(response)

        stream = asyncio.ensure_future(consume())
        await eventually(lambda: len(received) > 0, "the stream is running")
        served_while_streaming = 0
        for index in range(5):
            text = f"interactive query {index}"
            assert_encodes(await stub.Encode(request([text])), [text])
            served_while_streaming += len(received) < count
        await stream
        assert served_while_streaming == 5, "each unary call finished before the stream did"
        assert [r.sequence for r in received] == list(range(1, count + 1))


async def test_a_message_that_does_not_parse_ends_the_stream_with_invalid_argument(
    tmp_path: Path,
) -> None:
    async with fake_server(tmp_path) as handle:
        raw = raw_stream(handle)
        fine = list(messages([request(texts_of(n, 3)) for n in range(1, 5)]))
        first = fine[0]
        sent = [*(m.SerializeToString() for m in fine[:3]), CORRUPT, fine[3].SerializeToString()]
        call = raw(iter(sent))
        received: list[encode_pb2.EncodeStreamResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await read_into(call, received)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = str(failed.value.details())
        assert "EncodeStream: the request is not a valid message" in details
        assert "message 4 of the stream" in details
        assert error_info(failed.value)[0] == "INVALID_INPUT"
        # The requests read before it are not lost: each is answered before the stream ends;
        # the one after it is not run.
        assert [r.sequence for r in received] == [1, 2, 3]
        for response, n in zip(received, range(1, 4), strict=True):
            assert_encodes(response.response, texts_of(n, 3))
        # The server goes on serving streams.
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        responses = [r async for r in stub.EncodeStream(iter([first]))]
        assert [r.WhichOneof("result") for r in responses] == ["response"]


async def test_streamed_work_yields_to_an_interactive_call(tmp_path: Path) -> None:
    """An interactive call that arrives while a bulk stream keeps the model busy runs in a batch
    of its own as soon as the passes already formed end, and the bulk batches formed while it is
    about stay short (``--bulk-batch-items``, 2)."""
    async with fake_server(tmp_path) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        adapter = adapter_of(handle)
        warmup = adapter.passes_started
        adapter.hold()
        try:
            bulk = (request(texts_of(seq, 64)) for seq in range(1, 7))
            call = stub.EncodeStream(messages(bulk, window=3))
            await eventually(lambda: adapter.passes_started == warmup + 1, "a bulk pass runs")
            # The window's three requests: one pass running, one prepared, one queued.
            await eventually(lambda: pending_items(handle) == 3 * 64, "the window is admitted")
            await eventually(lambda: queued_items(handle) == 64, "two passes are formed")
            query = asyncio.ensure_future(stub.Encode(request(["interactive query"])))
            await eventually(lambda: queued_items(handle) == 65, "the query is queued")
        finally:
            adapter.release()
        assert_encodes(await query, ["interactive query"])
        answers = await collect(call)
        assert [a.WhichOneof("result") for a in answers] == ["response"] * 6
        ran = [p.texts for p in adapter.passes[warmup:]]
        at = ran.index(("interactive query",))
        assert at <= 2, f"the query waited for {at} passes: {[len(t) for t in ran]}"
        assert all(len(texts) <= 2 for texts in ran[at + 1 :]), [len(t) for t in ran]
        assert sum(len(t) for t in ran) == 6 * 64 + 1


async def test_a_client_still_writing_after_a_message_that_does_not_parse_gets_invalid_argument(
    tmp_path: Path,
) -> None:
    """The server reads what the client sends after the bad message until it half-closes, then
    ends the stream: a grpc aio client whose write fails because the call already ended reports
    INTERNAL instead of the server's status (grpc/grpc#36066)."""
    async with fake_server(tmp_path) as handle:
        raw = raw_stream(handle)
        after = [m.SerializeToString() for m in messages([request(["more"])] * 200)]
        call = raw(iter([CORRUPT, *after]))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await read_into(call, [])
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
        assert "message 1 of the stream" in str(failed.value.details())


async def test_a_client_that_never_stops_writing_after_a_bad_message_is_cut_off_at_the_limit(
    tmp_path: Path,
) -> None:
    """A client that keeps writing after a bad message, never quiet for ``--stream-drain-idle-s``,
    is read for ``--stream-drain-limit-s`` at most; then the stream ends. (Its grpc aio client,
    still writing, may report INTERNAL instead of the status: grpc/grpc#36066.) With the
    default limit of 30 s this would outlast the hang guard."""
    sent = 0
    stop = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield CORRUPT
        while not stop.is_set():
            sent += 1
            yield request(["more"]).SerializeToString()
            await asyncio.sleep(0.05)

    async with fake_server(tmp_path, stream_drain_idle_s=1.0, stream_drain_limit_s=0.5) as handle:
        call = raw_stream(handle)(endless())
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(read_into(call, []), HANG_GUARD_S)
        finally:
            stop.set()
        assert failed.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.INTERNAL,
        ), failed.value.details()
    assert sent > 1  # the server did read on after the bad message


def test_the_drain_bounds_are_settings_checked_at_start() -> None:
    defaults = load_settings([], {})
    assert (defaults.stream_drain_idle_s, defaults.stream_drain_limit_s) == (1.0, 30.0)
    env = {"SIE_STREAM_DRAIN_IDLE_S": "0.25", "SIE_STREAM_DRAIN_LIMIT_S": "0"}
    read = load_settings([], env)
    assert (read.stream_drain_idle_s, read.stream_drain_limit_s) == (0.25, 0.0)
    with pytest.raises(SystemExit, match="--stream-drain-idle-s must be positive"):
        load_settings(["--stream-drain-idle-s", "0"], {})
    with pytest.raises(SystemExit, match="--stream-drain-limit-s must be 0"):
        load_settings(["--stream-drain-limit-s", "-1"], {})


async def test_a_client_waiting_for_answers_after_a_bad_message_is_not_left_hanging(
    tmp_path: Path,
) -> None:
    """A windowed client sends a bad message and then waits for answers before it writes again
    (it never half-closes): the server stops waiting for more once the client has been quiet for
    ``--stream-drain-idle-s`` and ends the stream, the answers before the bad message delivered."""
    async with fake_server(tmp_path) as handle:
        raw = raw_stream(handle)
        never = asyncio.Event()

        async def windowed() -> AsyncIterator[bytes]:
            for message in messages([request(["a"]), request(["b"])]):
                yield message.SerializeToString()
            yield CORRUPT
            await never.wait()  # waits for answers that will not come

        call = raw(windowed())
        received: list[encode_pb2.EncodeStreamResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(read_into(call, received), HANG_GUARD_S)
        never.set()  # lets grpc's reader of ``windowed`` finish
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
        assert [r.sequence for r in received] == [1, 2]
