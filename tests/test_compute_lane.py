"""Which thread runs the forward passes (``--model-threads``, engine/model_thread.py): on the CPU
every model's passes run on one compute thread, so that torch's OpenMP runtime keeps a single
team of workers; with ``per-model`` (a GPU's default) each model has its own thread; a model's
load, and a LoRA adapter's fetch, run beside the compute thread and never hold up batches."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from sie_server.adapters import lora
from sie_server.config import Settings, load_settings
from sie_server.domain import InputItem
from sie_server.engine.compute_lane import ComputeLane
from sie_server.engine.registry import ModelRegistry, ModelState
from sie_server.errors import LoraLoading
from sie_server.grpc_api.server import build_registry
from sie_server.tasks.encode import EncodeCall, EncodeSettings

from tests.fakes import FakeAdapter, expected_vector
from tests.server_utils import HANG_GUARD_S, eventually, fake_entry, write_catalog_entry
from tests.tiny_models import dense
from tests.tiny_models.entries import DENSE_OUTPUTS, entry
from tests.tiny_models.lora import build_lora, cosines, reference_lora

FIRST, SECOND, SLOW = "fake/first", "fake/second", "fake/slow-load"
DOCS = EncodeSettings(output_types=("dense",))


@asynccontextmanager
async def registry_of(tmp_path: Path, model_threads: str) -> AsyncIterator[ModelRegistry]:
    catalog = tmp_path / "catalog"
    for name in (FIRST, SECOND):
        write_catalog_entry(catalog, fake_entry(name))
    write_catalog_entry(catalog, fake_entry(SLOW, load_options={"load_waits": True}))
    settings = Settings(models_dir=(catalog,), device="cpu", model_threads=model_threads)
    registry = build_registry(settings)
    try:
        yield registry
    finally:
        FakeAdapter.load_gate.set()
        await registry.close()


async def encode(
    registry: ModelRegistry, model: str, text: str, settings: EncodeSettings = DOCS
) -> list[float]:
    call = EncodeCall(items=[InputItem(text=text)], settings=settings)
    outcome = await asyncio.wait_for(registry.encode(model, call), HANG_GUARD_S)
    dense = outcome.result[0].dense
    assert dense is not None
    return [float(x) for x in dense]


def pass_threads(registry: ModelRegistry, model: str) -> set[str]:
    adapter = registry.entry(model).adapter
    assert isinstance(adapter, FakeAdapter)
    return {p.thread for p in adapter.passes}


@pytest.mark.parametrize(
    ("model_threads", "first_thread", "second_thread"),
    [
        ("auto", "sie-compute", "sie-compute"),
        ("shared", "sie-compute", "sie-compute"),
        ("per-model", f"sie-model-{FIRST}", f"sie-model-{SECOND}"),
    ],
)
async def test_forward_passes_run_on_the_configured_thread(
    tmp_path: Path, model_threads: str, first_thread: str, second_thread: str
) -> None:
    async with registry_of(tmp_path, model_threads) as registry:
        assert registry.config.shared_compute_thread is (model_threads != "per-model")
        for model in (FIRST, SECOND):
            await asyncio.wait_for(registry.load(model), HANG_GUARD_S)
        assert await encode(registry, FIRST, "one two") == list(expected_vector("one two"))
        assert await encode(registry, SECOND, "three") == list(expected_vector("three"))
        assert pass_threads(registry, FIRST) == {first_thread}
        assert pass_threads(registry, SECOND) == {second_thread}


@pytest.mark.parametrize("model_threads", ["shared", "per-model"])
async def test_a_load_never_holds_up_another_models_batches(
    tmp_path: Path, model_threads: str
) -> None:
    async with registry_of(tmp_path, model_threads) as registry:
        await asyncio.wait_for(registry.load(FIRST), HANG_GUARD_S)
        FakeAdapter.load_gate.clear()
        loading = registry.start_load(SLOW)
        await eventually(
            lambda: any(t.name == f"sie-load-{SLOW}" for t in threading.enumerate()),
            "the slow load runs on a thread of its own",
        )
        # The load is parked on its gate: the first model still serves.
        assert await encode(registry, FIRST, "served meanwhile") == list(
            expected_vector("served meanwhile")
        )
        assert registry.entry(SLOW).state is ModelState.LOADING
        FakeAdapter.load_gate.set()
        await asyncio.wait_for(loading, HANG_GUARD_S)
        assert registry.entry(SLOW).state is ModelState.LOADED
        assert await encode(registry, SLOW, "after") == list(expected_vector("after"))
        await eventually(
            lambda: not any(t.name == f"sie-load-{SLOW}" for t in threading.enumerate()),
            "the load's thread ends with the load",
        )


async def test_a_lora_fetch_never_holds_up_batches_on_the_shared_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = dense.build_tiny_dense(tmp_path / "dense")
    adapter_dir = str(build_lora(tmp_path / "lora", base, seed=5))
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(FIRST))
    write_catalog_entry(
        catalog, entry("tiny/lora", "dense", base, DENSE_OUTPUTS, lora={"allowed": [adapter_dir]})
    )
    gate, fetched_on = threading.Event(), []
    real_fetch = lora.fetch_adapter

    def parked_fetch(lora_id: str) -> lora.FetchedLora:  # a slow download
        fetched_on.append(threading.current_thread().name)
        assert gate.wait(HANG_GUARD_S)
        return real_fetch(lora_id)

    monkeypatch.setattr(lora, "fetch_adapter", parked_fetch)
    registry = build_registry(Settings(models_dir=(catalog,), device="cpu", model_threads="shared"))
    tuned = EncodeSettings(output_types=("dense",), options={"lora_id": adapter_dir})
    try:
        for model in (FIRST, "tiny/lora"):
            await asyncio.wait_for(registry.load(model), HANG_GUARD_S)
        with pytest.raises(LoraLoading):
            await encode(registry, "tiny/lora", "tuned", tuned)
        await eventually(lambda: bool(fetched_on), "the adapter's fetch starts")
        # The fetch is parked: the other model and this model's base both still serve.
        assert await encode(registry, FIRST, "meanwhile") == list(expected_vector("meanwhile"))
        plain = await encode(registry, "tiny/lora", "meanwhile")
        assert cosines(np.array([plain]), dense.reference_st(base, ["meanwhile"])).min() >= 0.9999
        gate.set()
        while True:
            try:
                got = await encode(registry, "tiny/lora", "tuned", tuned)
                break
            except LoraLoading:
                await asyncio.sleep(0.01)
        assert (
            cosines(np.array([got]), reference_lora(base, Path(adapter_dir), ["tuned"])).min()
            >= 0.9999
        )
        assert fetched_on == ["sie-load-tiny/lora"]
    finally:
        gate.set()
        await registry.close()


async def test_a_job_that_raises_leaves_the_lane_running(caplog: pytest.LogCaptureFixture) -> None:
    lane = ComputeLane("sie-test-lane")
    lane.start()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug outside the job's own handling")

    lane.put(broken, "broken")
    lane.put(lambda: ran.append(threading.current_thread().name), "after")
    with caplog.at_level(logging.ERROR, logger="sie_server.engine.compute_lane"):
        await lane.passed(HANG_GUARD_S)
        await lane.stop(HANG_GUARD_S)
    assert ran == ["sie-test-lane"]
    assert "a job failed outside its own handling" in caplog.text


def test_model_threads_is_validated_and_defaults_to_auto() -> None:
    assert load_settings([], {}).model_threads == "auto"
    assert load_settings(["--model-threads", "per-model"], {}).model_threads == "per-model"
    assert load_settings([], {"SIE_MODEL_THREADS": "shared"}).model_threads == "shared"
    with pytest.raises(SystemExit, match="--model-threads must be auto, shared, per-model"):
        load_settings(["--model-threads", "two"], {})
