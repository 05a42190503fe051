"""A compute lane stuck in one job: health NOT_SERVING while it is, with the lane and the job in
the log, SERVING again when it returns, its request answered; never SERVING again after a drain;
and passes shorter than the limit never touch health (``grpc_api/compute_watch.py``)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.config import load_settings
from sie_server.grpc_api.compute_watch import watch_compute

from tests.fakes import FakeAdapter
from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    eventually,
    fake_adapter,
    fake_model_server,
)

MODEL = "fake/watched"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fake_server(tmp_path: Path, **overrides: Any) -> AbstractAsyncContextManager[ServerHandle]:
    return fake_model_server(tmp_path, MODEL, {"load_options": {"delay_s": 0.02}}, **overrides)


def adapter_of(handle: ServerHandle) -> FakeAdapter:
    return fake_adapter(handle, MODEL)


async def health(handle: ServerHandle, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(handle.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def until_health(handle: ServerHandle, status: int) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while await health(handle) != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"health never became {status}")
        await asyncio.sleep(0.02)


def encode(handle: ServerHandle, text: str) -> Any:
    stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
    request = encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=text)])
    return asyncio.ensure_future(stub.Encode(request, timeout=HANG_GUARD_S))


async def test_a_stuck_pass_turns_health_off_until_it_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sie_server.grpc_api.compute_watch")
    async with fake_server(tmp_path, stuck_compute_s=0.3) as handle:
        adapter = adapter_of(handle)
        started = adapter.passes_started
        assert await health(handle) == SERVING
        adapter.hold()
        try:
            call = encode(handle, "held up")
            await eventually(lambda: adapter.passes_started == started + 1, "the pass runs")
            await until_health(handle, NOT_SERVING)
            for service in ("sie.v1.EncodeService", "sie.v1.ScoreService"):
                assert await health(handle, service) == NOT_SERVING
            assert not call.done()
        finally:
            adapter.release()
        reply = await call
        assert len(reply.items) == 1
        await until_health(handle, SERVING)
    stuck = [r.getMessage() for r in caplog.records if "stuck" in r.getMessage()]
    assert len(stuck) == 1, stuck
    assert "sie-compute" in stuck[0]
    assert f"{MODEL}: a batch of 1 items" in stuck[0]
    assert any("free again" in r.getMessage() for r in caplog.records)


async def test_after_a_drain_a_returning_pass_does_not_bring_serving_back(
    tmp_path: Path,
) -> None:
    async with fake_server(tmp_path, stuck_compute_s=0.3) as handle:
        adapter = adapter_of(handle)
        adapter.hold()
        try:
            call = encode(handle, "held up")
            await until_health(handle, NOT_SERVING)
            await handle.running.drain()
        finally:
            adapter.release()
        await call
        await eventually(lambda: not handle.running.compute_stuck, "the watch sees it return")
        assert await health(handle) == NOT_SERVING


async def test_passes_under_the_limit_leave_health_alone(tmp_path: Path) -> None:
    """Passes of 20 ms back to back, for 60 polls of a watch whose limit is 0.4 s."""
    async with fake_server(tmp_path, stuck_compute_s=0.4) as handle:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            await asyncio.gather(*(encode(handle, f"text {i}") for i in range(4)))
            assert await health(handle) == SERVING
        assert not handle.running.compute_stuck


async def test_zero_turns_the_watch_off(tmp_path: Path) -> None:
    async with fake_server(tmp_path, stuck_compute_s=0.0) as handle:
        assert handle.running.watch is None
    async with fake_server(tmp_path) as handle:  # the default: on
        assert handle.running.watch is not None
    assert load_settings([], {}).stuck_compute_s == 300.0
    with pytest.raises(SystemExit, match="--stuck-compute-s must be 0"):
        load_settings(["--stuck-compute-s", "-1"], {})


async def test_a_failing_poll_is_logged_and_the_watch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The watch is the server's alarm: a poll that raises must not end it."""
    polls: list[int] = []
    reports: list[bool] = []

    class Registry:
        def busy_lanes(self) -> list[tuple[str, str, float]]:
            polls.append(1)
            if len(polls) == 1:
                raise RuntimeError("a bad poll")
            return [("sie-compute", "m: a batch of 2 items", time.monotonic() - 10.0)]

    async def set_stuck(stuck: bool) -> None:
        reports.append(stuck)

    watch = asyncio.create_task(watch_compute(Registry(), 0.04, set_stuck))  # type: ignore[arg-type]
    try:
        await eventually(lambda: reports == [True], "the second poll reports the stuck lane")
    finally:
        watch.cancel()
    assert any("a poll failed" in r.getMessage() for r in caplog.records)
