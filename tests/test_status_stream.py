"""The status stream: real CPU device status, and streams that end when the server drains instead
of holding ``stop(grace)`` for the whole grace period."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import psutil  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
import torch
from sie_sdk.v1 import status_pb2, status_pb2_grpc
from sie_server.config import Settings
from sie_server.grpc_api import status
from sie_server.grpc_api.server import RunningServer, build_registry, create_server
from sie_server.grpc_api.status import DeviceSampler

from tests.server_utils import HANG_GUARD_S, error_info, fake_entry, write_catalog_entry

MODEL = "fake/status"
#: Much longer than any bounded wait below: a stream that held ``stop`` would time them out.
GRACE_S = 30.0


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    write_catalog_entry(folder, fake_entry(MODEL))
    return folder


@pytest_asyncio.fixture
async def running(catalog: Path) -> AsyncIterator[RunningServer]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        models_dir=(catalog,),
        device="cpu",
        grace_period_s=GRACE_S,
        status_interval_ms=50,
    )
    registry = build_registry(settings)
    server = await create_server(settings, registry)
    try:
        await registry.load(MODEL)
        await server.set_serving(True)
        yield server
    finally:
        await server.stop(0)


def stream(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryStreamCall[status_pb2.WatchStatusRequest, status_pb2.WatchStatusResponse]:
    return status_pb2_grpc.StatusServiceStub(channel).WatchStatus(
        status_pb2.WatchStatusRequest(interval_ms=50)
    )


async def drain_stream(
    call: grpc.aio.UnaryStreamCall[status_pb2.WatchStatusRequest, status_pb2.WatchStatusResponse],
) -> list[status_pb2.WatchStatusResponse]:
    """Every message until the stream ends (bounded: a stream that never ends fails the test)."""

    async def read() -> list[status_pb2.WatchStatusResponse]:
        messages = []
        while (message := await call.read()) is not grpc.aio.EOF:
            assert isinstance(message, status_pb2.WatchStatusResponse)
            messages.append(message)
        return messages

    return await asyncio.wait_for(read(), HANG_GUARD_S)


async def test_cpu_status_is_real(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = stream(channel)
        first = await asyncio.wait_for(call.read(), HANG_GUARD_S)
        call.cancel()
    assert isinstance(first, status_pb2.WatchStatusResponse)
    assert first.gpu == "cpu"
    assert first.loaded_models == [MODEL]
    [cpu] = first.gpus
    assert cpu.gpu_type == "cpu"
    assert cpu.name.strip()
    assert cpu.memory_used_bytes > 0
    assert cpu.memory_total_bytes == psutil.virtual_memory().total
    assert cpu.memory_used_bytes < cpu.memory_total_bytes
    assert cpu.memory_threshold_pct == pytest.approx(
        100.0 * cpu.memory_used_bytes / cpu.memory_total_bytes
    )
    assert 0.0 <= cpu.utilization_percent <= 100.0
    assert cpu.temperature_c == 0


def test_cpu_utilization_covers_the_time_since_the_previous_read() -> None:
    sampler = DeviceSampler("cpu")
    sampler.read_cpu()
    started = time.process_time()
    while time.process_time() - started < 0.05:  # burn CPU in this process
        pass
    busy = sampler.read_cpu()
    assert busy.utilization_percent > 0.0
    assert busy.memory_used_bytes > 0


async def test_open_streams_end_on_drain_and_stop_does_not_wait_the_grace_period(
    running: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        open_call = stream(channel)
        assert await asyncio.wait_for(open_call.read(), HANG_GUARD_S) is not grpc.aio.EOF

        await running.drain()
        await drain_stream(open_call)  # ends by itself
        assert await open_call.code() == grpc.StatusCode.OK

        # A call made after drain gets one snapshot and ends.
        late_call = stream(channel)
        late = await drain_stream(late_call)
        assert len(late) == 1
        assert late[0].loaded_models == [MODEL]
        assert await late_call.code() == grpc.StatusCode.OK


async def test_stop_with_a_long_grace_returns_once_streams_end(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        calls = [stream(channel) for _ in range(2)]
        for call in calls:
            assert await asyncio.wait_for(call.read(), HANG_GUARD_S) is not grpc.aio.EOF
        stopping = asyncio.ensure_future(running.stop(GRACE_S))
        for call in calls:
            await drain_stream(call)
            assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, HANG_GUARD_S)  # far less than GRACE_S


class FakeCuda:
    """The few ``torch.cuda`` calls the sampler makes, for two GPUs; ``nvml`` False makes the
    NVML-backed ones raise as they do without ``pynvml``."""

    GIB = 1024**3

    def __init__(self, nvml: bool) -> None:
        self.nvml = nvml
        self.mem_get_info_calls: list[int] = []

    def device_count(self) -> int:
        return 2

    def get_device_name(self, index: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def _need_nvml(self) -> None:
        if not self.nvml:
            raise ModuleNotFoundError("pynvml does not seem to be installed")

    def device_memory_used(self, index: int) -> int:
        self._need_nvml()
        return (index + 1) * self.GIB

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(total_memory=80 * self.GIB)

    def utilization(self, index: int) -> int:
        self._need_nvml()
        return 40 + index

    def temperature(self, index: int) -> int:
        self._need_nvml()
        return 60 + index

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self.mem_get_info_calls.append(index)
        return 70 * self.GIB, 80 * self.GIB


@pytest.mark.parametrize("nvml", [True, False])
async def test_cuda_status_per_gpu(nvml: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(nvml)
    monkeypatch.setattr(torch, "cuda", cuda)
    monkeypatch.setattr(status, "SAMPLE_REUSE_S", 3600.0)  # no clock in the reuse check below
    sampler = DeviceSampler("cuda:0")
    gpus = await asyncio.wait_for(sampler.sample(), HANG_GUARD_S)
    assert [g.index for g in gpus] == [0, 1]
    assert {g.gpu_type for g in gpus} == {"h100-80gb"}
    assert all(g.memory_total_bytes == 80 * FakeCuda.GIB for g in gpus)
    if nvml:
        assert [g.memory_used_bytes for g in gpus] == [FakeCuda.GIB, 2 * FakeCuda.GIB]
        assert [g.utilization_percent for g in gpus] == [40.0, 41.0]
        assert [g.temperature_c for g in gpus] == [60, 61]
        assert gpus[1].memory_threshold_pct == pytest.approx(2 / 80 * 100)
        assert cuda.mem_get_info_calls == []
    else:
        assert [g.memory_used_bytes for g in gpus] == [10 * FakeCuda.GIB] * 2
        assert [(g.utilization_percent, g.temperature_c) for g in gpus] == [(0.0, 0)] * 2
        assert cuda.mem_get_info_calls == [0, 1]
    # A second sample within the reuse window is the same reading, not a new one.
    assert await sampler.sample() is gpus


async def test_a_failing_snapshot_ends_the_stream_with_internal_not_unknown(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> status_pb2.WatchStatusResponse:
        raise RuntimeError("sensor read failed")

    monkeypatch.setattr(running.status.source, "snapshot", broken)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await drain_stream(stream(channel))
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(failed.value)[0] == "INTERNAL_ERROR"
    assert "sensor read failed" in (failed.value.details() or "")
