"""The gRPC client side: concurrent load, paired sequential latency, and a vector check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from bench_baseline import InProcess
from bench_common import CALL_TIMEOUT_S, MODEL, mean, percentile
from bench_server import Counters, ServerProcess, cpu_delta, read_counters
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

# The latency phase alternates blocks of this many server calls and in-process calls.
LATENCY_BLOCK = 20
LATENCY_SWITCH_PAUSE_S = 0.2


def encode_request(texts: Sequence[str]) -> encode_pb2.EncodeRequest:
    return encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=t) for t in texts])


@dataclass(slots=True)
class Recorder:
    """Per-call client latency and the server's own timing breakdown."""

    latencies_ms: list[float] = field(default_factory=list)
    server_ms: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def ok(self, started: float, reply: encode_pb2.EncodeResponse) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        if len(reply.items) != 1 or not reply.items[0].dense.values.data:
            self.errors.append("reply without one dense vector")
        self.tokens += sum(item.num_tokens for item in reply.items)
        t = reply.timing
        for name, value in (
            ("total", t.total_ms),
            ("queue", t.queue_ms),
            ("tokenization", t.tokenization_ms),
            ("inference", t.inference_ms),
            ("postprocessing", t.postprocessing_ms),
        ):
            self.server_ms.setdefault(name, []).append(value)

    def failed(self, exc: grpc.RpcError) -> None:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        self.errors.append(f"{code}: {exc}"[:300])


@dataclass(slots=True)
class LoadResult:
    label: str
    dtype: str
    concurrency: int
    calls_planned: int
    calls_ok: int
    errors: int
    first_errors: list[str]
    cut_by_time: bool
    wall_s: float
    texts_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_p50_ms: dict[str, float]
    server_mean_ms: dict[str, float]
    batches: float | None = None
    mean_batch_size: float | None = None
    batch_sizes: dict[str, int] | None = None
    #: Forward-pass time over wall time. Every item of a batch reports the same inference_ms,
    #: so the distinct values are the batches this phase's calls rode in.
    model_busy: float | None = None
    batch_tokens: float | None = None
    batch_padded_tokens: float | None = None
    padding: float | None = None
    counters_match_client_tokens: bool | None = None
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None


def summarize(
    label: str,
    server: ServerProcess,
    concurrency: int,
    planned: int,
    rec: Recorder,
    wall_s: float,
    cut: bool,
    client_cpu_s: float,
    server_cpu_s: float | None,
    delta: Counters | None,
) -> LoadResult:
    ok = len(rec.latencies_ms)
    result = LoadResult(
        label=label,
        dtype=server.dtype,
        concurrency=concurrency,
        calls_planned=planned,
        calls_ok=ok,
        errors=len(rec.errors),
        first_errors=rec.errors[:3],
        cut_by_time=cut,
        wall_s=wall_s,
        texts_per_s=ok / wall_s if wall_s > 0 else float("nan"),
        tokens_per_s=rec.tokens / wall_s if wall_s > 0 else float("nan"),
        p50_ms=percentile(rec.latencies_ms, 50),
        p95_ms=percentile(rec.latencies_ms, 95),
        p99_ms=percentile(rec.latencies_ms, 99),
        server_p50_ms={k: percentile(v, 50) for k, v in rec.server_ms.items()},
        server_mean_ms={k: mean(v) for k, v in rec.server_ms.items()},
        client_cpu_s=client_cpu_s,
        server_cpu_s=server_cpu_s,
    )
    forward_ms = set(rec.server_ms.get("inference", []))
    if concurrency > 1 and wall_s > 0:
        result.model_busy = sum(forward_ms) / 1000.0 / wall_s
    if delta is not None:
        result.batches = delta.batches
        result.batch_tokens = delta.tokens
        result.batch_padded_tokens = delta.padded_tokens
        result.mean_batch_size = delta.batched_items / delta.batches if delta.batches else None
        result.batch_sizes = delta.batch_sizes()
        result.padding = 1.0 - delta.tokens / delta.padded_tokens if delta.padded_tokens else None
        result.counters_match_client_tokens = int(delta.tokens) == rec.tokens
    return result


async def concurrent_load(
    label: str, server: ServerProcess, texts: Sequence[str], concurrency: int, limit_s: float
) -> LoadResult:
    """``concurrency`` clients on one channel, one text per call, until ``texts`` is used up."""
    rec = Recorder()
    pending = iter(range(len(texts)))  # shared by the workers; one event loop, so no lock
    cut = False

    async def worker(stub: encode_pb2_grpc.EncodeServiceAsyncStub, deadline: float) -> None:
        nonlocal cut
        for index in pending:
            if time.monotonic() > deadline:
                cut = True
                return
            request = encode_request([texts[index]])
            started = time.perf_counter()
            try:
                reply = await stub.Encode(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                rec.failed(exc)
                continue
            rec.ok(started, reply)

    before = await read_counters(server.address)
    server_cpu0, client_cpu0 = server.cpu_s(), time.process_time()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = encode_pb2_grpc.EncodeServiceStub(channel)
        await channel.channel_ready()
        started = time.perf_counter()
        deadline = time.monotonic() + limit_s
        await asyncio.gather(*(worker(stub, deadline) for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu0
    server_cpu = cpu_delta(server_cpu0, server.cpu_s())
    delta = await read_counters(server.address) - before
    return summarize(
        label, server, concurrency, len(texts), rec, wall_s, cut, client_cpu, server_cpu, delta
    )


def paired_latency(
    label: str, server: ServerProcess, local: InProcess, texts: Sequence[str], limit_s: float
) -> tuple[LoadResult, list[float]]:
    """One client (the blocking stub: the least client overhead), one text per call, in blocks
    that alternate with blocks of in-process batch-1 encodes of the same texts, so drift of the
    machine hits both sides alike. Blocks rather than single calls, with a pause at each switch:
    OpenMP worker threads spin for a while after a forward pass, and the other process's
    spinning threads would otherwise slow every call. Returns the server result and the
    in-process latencies."""
    rec = Recorder()
    local_ms: list[float] = []
    cut = False
    client_cpu = server_wall = 0.0
    with grpc.insecure_channel(server.address) as channel:
        stub = encode_pb2_grpc.EncodeServiceStub(channel)

        def server_block(block: Sequence[str]) -> None:
            nonlocal client_cpu, server_wall
            for text in block:
                request = encode_request([text])
                cpu0, started = time.process_time(), time.perf_counter()
                try:
                    reply = stub.Encode(request, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as exc:
                    rec.failed(exc)
                else:
                    rec.ok(started, reply)
                server_wall += time.perf_counter() - started
                client_cpu += time.process_time() - cpu0

        def local_block(block: Sequence[str]) -> None:
            local_ms.extend(local.time_one(text) for text in block)

        for text in texts[:5]:  # connection and first-call costs stay out of the numbers
            stub.Encode(encode_request([text]), timeout=CALL_TIMEOUT_S)
            local.encode([text], 1)
        server_cpu0 = server.cpu_s()
        deadline = time.monotonic() + limit_s
        for number, first in enumerate(range(0, len(texts), LATENCY_BLOCK)):
            if time.monotonic() > deadline:
                cut = True
                break
            block = texts[first : first + LATENCY_BLOCK]
            sides = (local_block, server_block) if number % 2 else (server_block, local_block)
            for side in sides:
                time.sleep(LATENCY_SWITCH_PAUSE_S)
                side(block)
    server_cpu = cpu_delta(server_cpu0, server.cpu_s())
    # Wall time covers the server calls only; server CPU also counts its idle time during the
    # in-process blocks and pauses, which is close to nothing.
    result = summarize(
        label, server, 1, len(texts), rec, server_wall, cut, client_cpu, server_cpu, None
    )
    return result, local_ms


def server_vectors(server: ServerProcess, texts: Sequence[str]) -> np.ndarray[Any, Any]:
    """One call with all ``texts``; the dense vectors, one row per text."""
    with grpc.insecure_channel(server.address) as channel:
        reply = encode_pb2_grpc.EncodeServiceStub(channel).Encode(
            encode_request(texts), timeout=CALL_TIMEOUT_S
        )
    return np.stack([np.asarray(from_tensor(item.dense.values)) for item in reply.items])
