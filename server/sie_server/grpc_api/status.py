"""The status snapshot, and the server-streaming status RPC that the bridge relays as ``/ws/status``.

``StatusSource.snapshot`` builds the one snapshot both the ``WatchStatus`` stream sends and the
metrics port renders (``sie_sdk.prometheus``).

Devices (``gpus``): on CUDA one entry per visible GPU; on CPU one entry for the CPU:

* ``name`` the CPU model (``/proc/cpuinfo``, else ``platform``), ``gpu_type`` "cpu";
* ``utilization_percent``: this process's CPU time (all threads) over the wall time since the
  previous sample, as a share of the CPUs the process may run on (0-100);
* ``memory_used_bytes`` the process RSS, ``memory_total_bytes`` the machine's memory;
* ``temperature_c`` 0 (unknown).

``memory_threshold_pct`` is, on every device, the share of its memory in use (used / total
x 100): this server evicts nothing, so it has no pressure threshold to report.

On CUDA, memory, utilization and temperature come from NVML through torch where ``pynvml`` is
installed (no CUDA context is created on other GPUs); without it, memory comes from
``torch.cuda.mem_get_info`` and utilization and temperature are 0. These reads run in a thread,
never on the event loop. Device samples are reused for ``SAMPLE_REUSE_S``, so any number of
streams costs at most one read per interval and a utilization window is never shorter.

Drain: ``end_streams`` (called when the server drains) ends every open ``WatchStatus`` stream
after its current snapshot, returning normally (status OK), so ``server.stop(grace)`` does not
wait out the grace period for them. A ``WatchStatus`` call made after drain gets one snapshot and
ends at once.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import platform
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped]
from sie_sdk.v1 import status_pb2, status_pb2_grpc

import sie_server
from sie_server.device import gpu_type_of
from sie_server.engine.registry import ModelRegistry, ModelState
from sie_server.errors import SIEServerError
from sie_server.grpc_api.errors import end_call

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
MIN_INTERVAL_MS = 50
SAMPLE_REUSE_S = MIN_INTERVAL_MS / 1000.0


class StatusSource:
    """Builds status snapshots of one server."""

    registry: ModelRegistry
    devices: DeviceSampler
    started: float

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.devices = DeviceSampler(registry.config.placement.device)
        self.started = time.time()

    async def snapshot(self) -> status_pb2.WatchStatusResponse:
        gpus = await self.devices.sample()
        placement = self.registry.config.placement
        models = []
        for entry in self.registry.entries():
            executor = entry.executor
            loaded = entry.state is ModelState.LOADED
            spec = entry.spec
            models.append(
                status_pb2.ModelStatus(
                    name=spec.name,
                    state=entry.state.value,
                    device=placement.device if loaded else "",
                    memory_bytes=entry.memory_bytes,
                    queue_depth=executor.batches_in_flight if executor else 0,
                    queue_pending_items=executor.pending_items if executor else 0,
                    config=status_pb2.ModelConfig(
                        adapter=spec.adapter,
                        max_sequence_length=spec.max_sequence_length,
                        outputs=list(spec.outputs),
                        default_profile=spec.default_profile,
                        tasks=list(spec.tasks),
                    ),
                )
            )
        metrics = self.registry.metrics
        return status_pb2.WatchStatusResponse(
            timestamp=time.time(),
            gpu=placement.gpu_type,
            loaded_models=[m.name for m in models if m.state == ModelState.LOADED.value],
            server=status_pb2.ServerInfo(
                version=sie_server.__version__,
                uptime_seconds=int(time.time() - self.started),
                user=_user(),
                working_dir=os.getcwd(),
                pid=os.getpid(),
            ),
            gpus=gpus,
            models=models,
            counters=metrics.counter_samples(),
            histograms=metrics.histogram_samples(),
        )


class StatusServicer(status_pb2_grpc.StatusServiceServicer):
    source: StatusSource
    default_interval_ms: int
    _draining: asyncio.Event

    def __init__(self, source: StatusSource, default_interval_ms: int) -> None:
        self.source = source
        self.default_interval_ms = default_interval_ms
        self._draining = asyncio.Event()

    def end_streams(self) -> None:
        """Drain: open streams end after their current snapshot, new ones after their first."""
        self._draining.set()

    async def WatchStatus(
        self, request: status_pb2.WatchStatusRequest, context: Context
    ) -> AsyncIterator[status_pb2.WatchStatusResponse]:
        interval_s = max(request.interval_ms or self.default_interval_ms, MIN_INTERVAL_MS) / 1000.0
        while True:
            try:
                snapshot = await self.source.snapshot()
            except Exception as exc:  # never UNKNOWN: the one error mapping, as unary calls get
                log.exception("building a status snapshot failed")
                end_call(
                    context, SIEServerError(f"status snapshot failed: {type(exc).__name__}: {exc}")
                )
                return
            yield snapshot
            if self._draining.is_set():
                return
            try:
                await asyncio.wait_for(self._draining.wait(), interval_s)
            except TimeoutError:
                continue
            return


class DeviceSampler:
    """The snapshot's ``gpus`` for the serving device (see the module docstring)."""

    device: str
    _cuda: bool
    _cpu_name: str
    _cpus: int
    _memory_total: int
    _process: Any  # psutil.Process
    _last_cpu_s: float
    _last_wall_s: float
    _nvml: bool
    _cached: list[status_pb2.GpuStatus]
    _cached_at: float
    _reading: asyncio.Future[list[status_pb2.GpuStatus]] | None

    def __init__(self, device: str) -> None:
        self.device = device
        self._cuda = device.startswith("cuda")
        self._cpu_name = "" if self._cuda else _cpu_name()
        self._cpus = _usable_cpus()
        self._memory_total = int(psutil.virtual_memory().total)
        self._process = psutil.Process()
        self._last_cpu_s, self._last_wall_s = time.process_time(), time.monotonic()
        self._nvml = True
        self._cached, self._cached_at = [], float("-inf")
        self._reading = None

    async def sample(self) -> list[status_pb2.GpuStatus]:
        if time.monotonic() - self._cached_at < SAMPLE_REUSE_S:
            return self._cached
        if not self._cuda:
            gpus = [self.read_cpu()]
        else:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(asyncio.to_thread(self._read_cuda))
            gpus = await asyncio.shield(self._reading)
        self._cached, self._cached_at = gpus, time.monotonic()
        return gpus

    def read_cpu(self) -> status_pb2.GpuStatus:
        """The CPU entry; its utilization covers the time since the previous read."""
        cpu_s, wall_s = time.process_time(), time.monotonic()
        elapsed = max(wall_s - self._last_wall_s, 1e-9)
        busy = (cpu_s - self._last_cpu_s) / elapsed / self._cpus * 100.0
        self._last_cpu_s, self._last_wall_s = cpu_s, wall_s
        rss = int(self._process.memory_info().rss)
        total = self._memory_total
        return status_pb2.GpuStatus(
            index=0,
            name=self._cpu_name,
            gpu_type="cpu",
            utilization_percent=min(max(busy, 0.0), 100.0),
            memory_used_bytes=rss,
            memory_total_bytes=total,
            memory_threshold_pct=100.0 * rss / total if total else 0.0,
            temperature_c=0,
        )

    def _read_cuda(self) -> list[status_pb2.GpuStatus]:
        """Every visible GPU (a worker thread)."""
        try:
            import torch

            return [self._read_gpu(torch, index) for index in range(torch.cuda.device_count())]
        except Exception:
            log.warning("reading GPU status failed", exc_info=True)
            return []

    def _read_gpu(self, torch: Any, index: int) -> status_pb2.GpuStatus:
        name = str(torch.cuda.get_device_name(index))
        utilization, temperature = 0.0, 0
        if self._nvml:
            try:
                used = int(torch.cuda.device_memory_used(index))
                total = int(torch.cuda.get_device_properties(index).total_memory)
                utilization = float(torch.cuda.utilization(index))
                temperature = int(torch.cuda.temperature(index))
            except Exception as exc:  # pynvml missing or NVML unusable: stop asking
                log.info("GPU utilization unavailable (%s: %s)", type(exc).__name__, exc)
                self._nvml = False
        if not self._nvml:
            free, total = torch.cuda.mem_get_info(index)
            used = int(total - free)
        return status_pb2.GpuStatus(
            index=index,
            name=name,
            gpu_type=gpu_type_of(name),
            utilization_percent=utilization,
            memory_used_bytes=used,
            memory_total_bytes=int(total),
            memory_threshold_pct=100.0 * used / total if total else 0.0,
            temperature_c=temperature,
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _cpu_name() -> str:
    """The CPU model: ``model name`` (x86) or ``Model``/``Hardware`` (ARM) in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _usable_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
