"""The loaded models out of the cyclic collector's way (engine/heap.py): a load freezes the heap,
so full collections skip the models; an eviction hands the heap back and collects, so a model
caught in a reference cycle is still freed; a failed load and a closed registry hand it back.
A refused call (an error, or no API key) leaves no more cyclic garbage than an answered one
(grpc_api/errors.py, ``end_call``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.config import Settings
from sie_server.engine import heap
from sie_server.engine.registry import ModelState
from sie_server.errors import ModelLoadFailed
from sie_server.grpc_api.server import build_registry

from tests.server_utils import HANG_GUARD_S, fake_entry, serving, write_catalog_entry
from tests.tiny_models.entries import DENSE_OUTPUTS, entry

MODEL, BROKEN = "fake/heap", "fake/heap-broken"


class Cycle:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_settled_cycle_outlives_collections_until_reclaimed() -> None:
    ref = weakref.ref(Cycle())
    heap.settle()
    gc.collect()
    assert ref() is not None  # frozen: skipped by collections
    heap.reclaim()
    assert ref() is None
    assert gc.get_freeze_count() > 0  # settled again after the collection


async def test_a_load_settles_and_an_eviction_frees_the_model_even_in_a_cycle(
    tmp_path: Path,
) -> None:
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    write_catalog_entry(catalog, entry(BROKEN, "dense", empty, DENSE_OUTPUTS))
    registry = build_registry(Settings(models_dir=(catalog,), device="cpu"))
    try:
        assert gc.get_freeze_count() == 0
        await asyncio.wait_for(registry.load(MODEL), HANG_GUARD_S)
        assert gc.get_freeze_count() > 0
        adapter = registry.entry(MODEL).adapter
        adapter.cycle = Cycle()  # type: ignore[union-attr]
        adapter.cycle.owner = adapter  # type: ignore[union-attr]
        gone = weakref.ref(adapter)
        heap.settle()  # the adapter and its cycle are frozen now
        del adapter
        await asyncio.wait_for(registry.evict(MODEL), HANG_GUARD_S)
        assert registry.entry(MODEL).state is ModelState.AVAILABLE
        assert gone() is None
        # A failed load hands the heap back to the collector.
        with pytest.raises(ModelLoadFailed, match="loading fake/heap-broken failed"):
            await asyncio.wait_for(registry.load(BROKEN), HANG_GUARD_S)
        assert gc.get_freeze_count() == 0
        await asyncio.wait_for(registry.load(MODEL), HANG_GUARD_S)
        assert gc.get_freeze_count() > 0
    finally:
        await registry.close()
    assert gc.get_freeze_count() == 0


async def garbage_per_call(call: Callable[[], Awaitable[object]]) -> float:
    """Objects the cyclic collector frees per call (answered or refused)."""
    for _ in range(10):  # warm: first calls create lasting state
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call()
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call()
        return gc.collect() / 100
    finally:
        gc.enable()


def encode(
    stub: encode_pb2_grpc.EncodeServiceStub, model: str, metadata: tuple[tuple[str, str], ...] = ()
) -> Callable[[], Awaitable[object]]:
    request = encode_pb2.EncodeRequest(model=model, items=[common_pb2.Item(text="hi")])
    return lambda: stub.Encode(request, metadata=metadata)


async def test_a_refusal_leaves_no_more_cyclic_garbage_than_an_answer(tmp_path: Path) -> None:
    """A refused call's error and grpc's abort once left ~48 objects in reference cycles each
    (only the cyclic collector freed them, and under overload refusals are most calls). A
    request that does not parse is refused by the interceptor the same way."""
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL))
    async with serving([catalog], preload=[MODEL]) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        answered = await garbage_per_call(encode(stub, MODEL))
        refused = await garbage_per_call(encode(stub, "nope/missing"))
        raw = handle.channel.unary_unary("/sie.v1.EncodeService/Encode")
        malformed = await garbage_per_call(lambda: raw(b"\xff\xff\xff"))
    assert refused <= answered + 2, (refused, answered)
    assert malformed <= answered + 2, (malformed, answered)


async def test_an_unauthenticated_call_leaves_no_more_cyclic_garbage_than_an_answer(
    tmp_path: Path,
) -> None:
    """The API-key interceptor's refusal (a flood of calls without a key) ends the call the
    same way: about 50 objects in cycles per call while it aborted."""
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL))
    async with serving([catalog], preload=[MODEL], api_keys=("heap-key",)) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        answered = await garbage_per_call(
            encode(stub, MODEL, (("authorization", "Bearer heap-key"),))
        )
        refused = await garbage_per_call(encode(stub, MODEL))
    assert refused <= answered + 2, (refused, answered)


def test_a_reclaim_runs_only_for_what_a_later_settle_may_have_frozen() -> None:
    before = heap.epoch()
    ref = weakref.ref(Cycle())
    assert not heap.reclaim_if_settled_since(before)  # nothing settled since: no collection
    assert heap.epoch() == before
    heap.settle()
    gc.collect()
    assert ref() is not None
    assert heap.reclaim_if_settled_since(before)
    assert ref() is None
    assert heap.epoch() == before + 2  # the settle, and the one that ends the reclaim
