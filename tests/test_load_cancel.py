"""A cancelled model load (shutdown, or a caller giving up on preload) stops its model thread,
leaves the model loadable again instead of LOADING forever, and a later load works."""

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


def model_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"sie-model-{MODEL}" and t.is_alive()]


async def test_a_cancelled_load_stops_its_thread_and_can_load_again(tmp_path: Path) -> None:
    # Warm-up runs forward passes of 0.3 s each: the cancel lands mid-load.
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL, load_options={"delay_s": 0.3}))
    registry = build_registry(Settings(models_dir=(tmp_path / "catalog",), device="cpu"))
    try:
        task = registry.start_load(MODEL)
        await eventually(lambda: bool(model_threads()), "the model thread runs")
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        entry = registry.entry(MODEL)
        assert entry.state is ModelState.AVAILABLE
        assert entry.executor is None
        await eventually(lambda: not model_threads(), "the model thread stops")
        await asyncio.wait_for(registry.load(MODEL), HANG_GUARD_S)
        assert registry.entry(MODEL).state is ModelState.LOADED
    finally:
        await registry.close()
