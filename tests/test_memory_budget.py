"""Models and memory (issue 18): a model loads once however many ask at once; under a memory
budget the least recently used model is evicted, its queued work completes, new calls to it are
refused with a retryable answer while it unloads, and it reloads on demand; ``--models`` limits
what may load at all."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, models_pb2, models_pb2_grpc
from sie_server.config import Settings
from sie_server.engine.registry import ModelState
from sie_server.grpc_api.server import build_registry

from tests.fakes import FakeAdapter
from tests.server_utils import (
    HANG_GUARD_S,
    error_info,
    eventually,
    fake_entry,
    serving,
    write_catalog_entry,
)

A, B, C = "fake/mem-a", "fake/mem-b", "fake/mem-c"


def _catalog(root: Path, names: tuple[str, ...] = (A, B, C), **options: Any) -> Path:
    folder = root / "catalog"
    for name in names:
        write_catalog_entry(folder, fake_entry(name, load_options={"memory_mb": 10, **options}))
    return folder


def _request(model: str, text: str = "hello") -> encode_pb2.EncodeRequest:
    return encode_pb2.EncodeRequest(model=model, items=[common_pb2.Item(text=text)])


async def _encode_when_loaded(stub: Any, model: str) -> encode_pb2.EncodeResponse:
    """Call until the model has loaded: MODEL_LOADING (or MODEL_NOT_LOADED) first is fine."""
    for _ in range(int(HANG_GUARD_S / 0.01)):
        try:
            return await stub.Encode(_request(model))
        except grpc.aio.AioRpcError as exc:
            reason = error_info(exc)[0]
        if reason not in ("MODEL_LOADING", "MODEL_NOT_LOADED"):
            pytest.fail(f"{model}: {reason}")
        await asyncio.sleep(0.01)
    pytest.fail(f"{model} never loaded")


async def test_many_concurrent_callers_load_a_model_once(tmp_path: Path) -> None:
    name = "fake/load-once"
    before = FakeAdapter.loads[name]
    write_catalog_entry(tmp_path / "catalog", fake_entry(name))
    async with serving([tmp_path / "catalog"]) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        results = await asyncio.gather(*(_encode_when_loaded(stub, name) for _ in range(32)))
    assert len(results) == 32
    assert FakeAdapter.loads[name] - before == 1


async def test_the_least_recently_used_model_is_evicted_its_queued_work_completes_and_it_reloads(
    tmp_path: Path,
) -> None:
    # Three models of 10 MiB under a 25 MiB budget of loaded weights: two fit. A thread per
    # model: B's forward pass is held below while A serves (on one shared compute thread A's
    # batch would wait behind B's).
    async with serving(
        [_catalog(tmp_path)], memory_budget_mb=25, memory_gauge="weights", model_threads="per-model"
    ) as handle:
        registry = handle.running.registry
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        await _encode_when_loaded(stub, A)
        await _encode_when_loaded(stub, B)
        b_adapter = registry.entry(B).adapter
        assert isinstance(b_adapter, FakeAdapter)
        # B has work queued behind a held forward pass...
        b_adapter.hold()
        queued = [
            asyncio.ensure_future(stub.Encode(_request(B, f"queued {i}"), timeout=HANG_GUARD_S))
            for i in range(8)
        ]
        await eventually(lambda: b_adapter.passes_started >= 1, "B runs a batch")
        # ...then A is used, so B is the least recently used when C loads.
        await stub.Encode(_request(A))
        with pytest.raises(grpc.aio.AioRpcError) as loading:
            await stub.Encode(_request(C))
        assert error_info(loading.value)[0] == "MODEL_LOADING"
        await eventually(
            lambda: registry.entry(B).state is ModelState.UNLOADING, "B is being evicted"
        )
        # While B unloads, a new call is refused with a retryable answer, never queued.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Encode(_request(B))
        reason, _, retry = error_info(refused.value)
        assert reason == "MODEL_NOT_LOADED"
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert retry is not None
        b_adapter.release()
        done = await asyncio.gather(*queued)
        assert [r.items[0].dense.dims for r in done] == [2] * 8  # the queued work completed
        await eventually(lambda: registry.entry(C).state is ModelState.LOADED, "C loads")
        await eventually(lambda: registry.entry(B).state is ModelState.AVAILABLE, "B unloaded")
        assert not b_adapter.loaded  # unloaded on its own thread
        assert registry.entry(A).state is ModelState.LOADED
        # B again: it reloads on demand, and A (now the least recently used) makes room.
        await _encode_when_loaded(stub, B)
        assert registry.entry(A).state is ModelState.AVAILABLE
        assert {registry.entry(n).state for n in (B, C)} == {ModelState.LOADED}
        evictions = {
            labels["model"]: value
            for name, labels, value in registry.metrics.counters()
            if name == "sie_model_evictions_total"
        }
        assert evictions == {B: 1, A: 1}


async def test_the_process_gauge_evicts_under_a_budget_below_the_process(tmp_path: Path) -> None:
    # 1 MiB of RSS is always exceeded: each load evicts every other loaded model.
    async with serving([_catalog(tmp_path, (A, B))], memory_budget_mb=1) as handle:
        registry = handle.running.registry
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        await _encode_when_loaded(stub, A)
        await _encode_when_loaded(stub, B)
        assert registry.entry(A).state is ModelState.AVAILABLE
        assert registry.entry(B).state is ModelState.LOADED  # the one model left is kept


async def test_models_limits_what_may_load(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, (A, B))
    async with serving([catalog], models=(A,)) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        await _encode_when_loaded(stub, A)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Encode(_request(B))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await models_pb2_grpc.ModelServiceStub(handle.channel).ListModels(
            models_pb2.ListModelsRequest()
        )
        assert [m.name for m in listed.models] == [A]
    for overrides, fragment in (
        ({"models": ("nope/model",)}, "--models names models not in the catalog: nope/model"),
        ({"models": (A,), "preload": (B,)}, "--preload names models outside --models"),
    ):
        settings = Settings(models_dir=(catalog,), device="cpu", **overrides)
        with pytest.raises(SystemExit, match=fragment):
            build_registry(settings)


def test_a_models_need_is_estimated_from_its_weight_files(tmp_path: Path) -> None:
    from sie_server.engine.memory import weight_files_bytes

    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"x" * 5)
    (tmp_path / "sub" / "deeper").mkdir()
    (tmp_path / "sub" / "deeper" / "other.bin").write_bytes(b"x" * 7)  # two levels down: not read
    (tmp_path / "README.md").write_text("not weights")
    assert weight_files_bytes(str(tmp_path)) == 15
    assert weight_files_bytes("BAAI/bge-m3") == 0  # a hub id: unknown until downloaded
