"""The timing breakdown every response carries adds up: total = tokenization + queue + inference
+ postprocessing, where queue is everything between admission and the last result that was not
the request's own forward passes (waiting, collation, other batches running first)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.engine.pipeline import covered_ms

from tests.fakes import FakeAdapter
from tests.server_utils import HANG_GUARD_S, eventually, fake_entry, serving, write_catalog_entry

MODEL = "fake/timing"


def parts(timing: common_pb2.Timing) -> float:
    return timing.tokenization_ms + timing.queue_ms + timing.inference_ms + timing.postprocessing_ms


async def test_the_breakdown_adds_up_and_counts_waiting_behind_another_batch(
    tmp_path: Path,
) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    async with serving([tmp_path / "catalog"], [MODEL]) as handle:
        entry = handle.running.registry.entry(MODEL)
        adapter, executor = entry.adapter, entry.executor
        assert isinstance(adapter, FakeAdapter)
        assert executor is not None
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)

        def call(text: str, is_query: bool) -> encode_pb2.EncodeRequest:
            return encode_pb2.EncodeRequest(
                model=MODEL,
                items=[common_pb2.Item(text=text)],
                params=encode_pb2.EncodeParams(is_query=is_query),
            )

        warm = adapter.passes_started
        adapter.hold()
        try:
            first = asyncio.ensure_future(stub.Encode(call("first pass", False)))
            await eventually(lambda: adapter.passes_started == warm + 1, "the first pass runs")
            # Another key: it cannot join the running batch and waits behind it.
            second = asyncio.ensure_future(stub.Encode(call("second pass", True)))
            await eventually(lambda: executor.pending_items == 2, "the second call is queued")
        finally:
            adapter.release()
        one, two = await asyncio.wait_for(asyncio.gather(first, second), HANG_GUARD_S)
    for reply in (one, two):
        assert reply.timing.total_ms == pytest.approx(parts(reply.timing), abs=1e-6)
        assert reply.timing.inference_ms > 0
    assert two.timing.queue_ms > 0
    assert two.items[0].dense.values.data != b""


async def test_passes_side_by_side_count_once_in_a_requests_inference(tmp_path: Path) -> None:
    """Three items in batches of one on two workers: the second and third passes overlap, and
    the request's inference is the time its passes covered, not their sum (which would exceed
    the total)."""
    options = {"concurrent": True, "delay_s": 0.1}
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL, load_options=options))
    async with serving(
        [tmp_path / "catalog"], [MODEL], compute_workers=2, max_batch_items=1
    ) as handle:
        adapter = handle.running.registry.entry(MODEL).adapter
        assert isinstance(adapter, FakeAdapter)
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        request = encode_pb2.EncodeRequest(
            model=MODEL, items=[common_pb2.Item(text=f"item {i}") for i in range(3)]
        )
        reply = await asyncio.wait_for(stub.Encode(request), HANG_GUARD_S)
    passes = [p for p in adapter.passes if any(t.startswith("item") for t in p.texts)]
    assert len(passes) == 3
    spans = sorted((p.started, p.ended) for p in passes)
    assert spans[2][0] < spans[1][1], "the last two passes overlapped"
    summed_ms = sum(end - start for start, end in spans) * 1000.0
    assert reply.timing.total_ms == pytest.approx(parts(reply.timing), abs=1e-6)
    assert reply.timing.inference_ms <= reply.timing.total_ms
    assert reply.timing.inference_ms < summed_ms


def test_covered_time_counts_overlapping_passes_once() -> None:
    assert covered_ms([]) == 0.0
    assert covered_ms([(10.0, 100.0)]) == pytest.approx(100.0)
    # Two apart, two overlapping by 50 ms, one inside another.
    assert covered_ms([(0.0, 100.0), (1.0, 100.0)]) == pytest.approx(200.0)
    assert covered_ms([(0.0, 100.0), (0.05, 100.0)]) == pytest.approx(150.0)
    assert covered_ms([(0.0, 300.0), (0.1, 50.0)]) == pytest.approx(300.0)
