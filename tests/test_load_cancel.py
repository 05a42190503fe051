"""A cancelled model load (shutdown, or a caller giving up on preload) leaves the model loadable
again instead of LOADING forever, frees the threads it held, and a later load works: with every
model on one shared compute thread (the CPU's default) and with a thread per model (a GPU's)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from sie_server.config import Settings
from sie_server.engine.registry import ModelState
from sie_server.grpc_api.server import build_registry

from tests.server_utils import HANG_GUARD_S, eventually, fake_entry, write_catalog_entry

MODEL = "fake/cancelled"
OTHER = "fake/other"


def threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


async def test_a_cancelled_load_stops_its_thread_and_can_load_again(tmp_path: Path) -> None:
    """A thread per model: the cancelled model's thread ends."""
    # Warm-up runs forward passes of 0.3 s each: the cancel lands mid-load.
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL, load_options={"delay_s": 0.3}))
    settings = Settings(models_dir=(tmp_path / "catalog",), device="cpu", model_threads="per-model")
    registry = build_registry(settings)
    own = f"sie-model-{MODEL}"
    try:
        task = registry.start_load(MODEL)
        await eventually(lambda: bool(threads(own)), "the model thread runs")
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        entry = registry.entry(MODEL)
        assert entry.state is ModelState.AVAILABLE
        assert entry.executor is None
        await eventually(lambda: not threads(own), "the model thread stops")
        await asyncio.wait_for(registry.load(MODEL), HANG_GUARD_S)
        assert registry.entry(MODEL).state is ModelState.LOADED
    finally:
        await registry.close()


async def test_a_cancelled_load_on_the_shared_thread_leaves_it_serving(tmp_path: Path) -> None:
    """One compute thread for every model: cancelling one model's load (mid warm-up, on the
    shared thread) leaves that thread serving the others, and no load thread behind."""
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL, load_options={"delay_s": 0.3}))
    write_catalog_entry(catalog, fake_entry(OTHER))
    registry = build_registry(Settings(models_dir=(catalog,), device="cpu"))
    assert registry.config.shared_compute_thread, "the CPU's default is one compute thread"
    try:
        await asyncio.wait_for(registry.load(OTHER), HANG_GUARD_S)
        task = registry.start_load(MODEL)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert registry.entry(MODEL).state is ModelState.AVAILABLE
        assert registry.entry(MODEL).executor is None
        await eventually(lambda: not threads(f"sie-load-{MODEL}"), "the load's thread ends")
        assert not threads(f"sie-model-{MODEL}")
        assert not threads(f"sie-model-{OTHER}")
        assert len(threads("sie-compute")) == 1
        other = registry.entry(OTHER).executor
        assert other is not None
        assert await asyncio.wait_for(other.call(lambda: "served"), HANG_GUARD_S) == "served"
        await asyncio.wait_for(registry.load(MODEL), HANG_GUARD_S)
        assert registry.entry(MODEL).state is ModelState.LOADED
    finally:
        await registry.close()
    await eventually(lambda: not threads("sie-compute"), "close stops the compute thread")
