"""Overload through the real gRPC server, with the fake model served from a catalog entry.

The model is held on its gate (``FakeAdapter.hold``) so "saturated" is a state, not a race:
whatever answers while it is held answered before the saturating calls could finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.engine.executor import BatchExecutor

from tests.fakes import FakeAdapter, expected_vector
from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    error_info,
    eventually,
    serving,
    write_catalog_entry,
)

MODEL = "fake/overload"


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    write_catalog_entry(
        folder,
        {
            "name": MODEL,
            "adapter": "tests.fakes:FakeAdapter",
            "weights_path": str(tmp_path),
            "max_sequence_length": 64,
            "outputs": {"dense": {"dims": 2}},
            "load_options": {"delay_s": 0.3},
        },
    )
    return folder


def request(texts: Sequence[str]) -> encode_pb2.EncodeRequest:
    return encode_pb2.EncodeRequest(
        model=MODEL,
        items=[common_pb2.Item(id=f"i{n}", text=text) for n, text in enumerate(texts)],
    )


def ten_tokens(tag: str) -> str:
    return " ".join([tag, *(f"w{i}" for i in range(7))])  # 8 words + BOS/EOS


def model_of(handle: ServerHandle) -> tuple[FakeAdapter, BatchExecutor]:
    entry = handle.running.registry.entry(MODEL)
    assert isinstance(entry.adapter, FakeAdapter)
    assert entry.executor is not None
    return entry.adapter, entry.executor


def assert_vectors(response: encode_pb2.EncodeResponse, texts: Sequence[str]) -> None:
    assert [item.id for item in response.items] == [f"i{n}" for n in range(len(texts))]
    for item, text in zip(response.items, texts, strict=True):
        assert item.num_tokens == len(text.split()) + 2
        assert from_tensor(item.dense.values).tolist() == expected_vector(text).tolist()


async def test_saturated_server_sheds_load_stays_healthy_and_drops_cancelled_work(
    catalog: Path,
) -> None:
    # Bound 50 tokens: the running call (10) + a queued call (20) + the one cancelled later
    # (10) fit; a further 20 does not.
    async with serving([catalog], [MODEL], max_pending_tokens=50) as handle:
        adapter, executor = model_of(handle)
        encode = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        health = health_pb2_grpc.HealthStub(handle.channel)
        warm_up = adapter.passes_started  # the registry's warm-up pass

        running_texts = [ten_tokens("running")]
        queued_texts = [ten_tokens("queued-a"), ten_tokens("queued-b")]
        cancelled_texts = [ten_tokens("cancelled")]
        refused_texts = [ten_tokens("refused-a"), ten_tokens("refused-b")]

        async def call(texts: Sequence[str]) -> encode_pb2.EncodeResponse:
            return await encode.Encode(request(texts))

        adapter.hold()
        try:
            running = asyncio.create_task(call(running_texts))
            await eventually(lambda: adapter.passes_started == warm_up + 1, "the model is busy")
            queued = asyncio.create_task(call(queued_texts))
            await eventually(lambda: executor.pending_items == 3, "the second call is queued")
            doomed = encode.Encode(request(cancelled_texts))
            await eventually(lambda: executor.pending_items == 4, "the third call is queued")

            # Over the bound: refused while the model is still held.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await encode.Encode(request(refused_texts))
            assert not running.done()
            assert not queued.done()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reason, metadata, retry_s = error_info(refused.value)
            trailers = dict(refused.value.trailing_metadata() or ())
            assert reason == "QUEUE_FULL"
            assert metadata == {"model": MODEL}
            assert retry_s is not None
            assert retry_s > 0
            assert trailers["grpc-retry-pushback-ms"] == str(int(retry_s * 1000))
            assert executor.pending_items == 4, "the refused call admitted nothing"

            # The health service answers from the event loop, not the busy model thread.
            for service in ("", "sie.v1.EncodeService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            assert not running.done()

            # A client cancel reaches the engine and releases its admission.
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            await eventually(lambda: executor.pending_items == 3, "the server drops the call")
            assert adapter.passes_started == warm_up + 1, "nothing else reached the model yet"
        finally:
            adapter.release()

        running_reply, queued_reply = await asyncio.wait_for(
            asyncio.gather(running, queued), HANG_GUARD_S
        )
        assert_vectors(running_reply, running_texts)
        assert_vectors(queued_reply, queued_texts)
        seen = adapter.seen_texts()
        assert not seen & set(cancelled_texts), "a cancelled call's items reached the model"
        assert not seen & set(refused_texts)
        assert seen >= set(running_texts) | set(queued_texts)

        # Drained: admitted again.
        assert executor.pending_items == 0
        after = await encode.Encode(request(["after the storm"]))
        assert_vectors(after, ["after the storm"])
