"""The server-streaming status RPC that the bridge relays as ``/ws/status``."""

from __future__ import annotations

import asyncio
import getpass
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sie_sdk.v1 import status_pb2, status_pb2_grpc

import sie_server
from sie_server.engine.registry import ModelRegistry, ModelState

Context = grpc.aio.ServicerContext[Any, Any]
MIN_INTERVAL_MS = 50


class StatusServicer(status_pb2_grpc.StatusServiceServicer):
    def __init__(self, registry: ModelRegistry, default_interval_ms: int) -> None:
        self.registry = registry
        self.default_interval_ms = default_interval_ms
        self.started = time.time()

    async def WatchStatus(
        self, request: status_pb2.WatchStatusRequest, context: Context
    ) -> AsyncIterator[status_pb2.WatchStatusResponse]:
        interval_ms = max(request.interval_ms or self.default_interval_ms, MIN_INTERVAL_MS)
        while True:
            yield self.snapshot()
            await asyncio.sleep(interval_ms / 1000.0)

    def snapshot(self) -> status_pb2.WatchStatusResponse:
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
            gpus=_gpus(placement.device),
            models=models,
            counters=[
                status_pb2.CounterSample(name=name, labels=labels, value=value)
                for name, labels, value in metrics.counters()
            ],
            histograms=[
                status_pb2.HistogramSample(
                    name=name,
                    labels=labels,
                    bounds=list(h.buckets),
                    counts=h.counts,
                    sum=h.total,
                    count=h.count,
                )
                for name, labels, h in metrics.histograms()
            ],
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _gpus(device: str) -> list[status_pb2.GpuStatus]:
    if not device.startswith("cuda"):
        return []
    import torch

    from sie_server.device import gpu_type_of

    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        gpus.append(
            status_pb2.GpuStatus(
                index=index,
                name=name,
                gpu_type=gpu_type_of(name),
                memory_used_bytes=total - free,
                memory_total_bytes=total,
            )
        )
    return gpus
