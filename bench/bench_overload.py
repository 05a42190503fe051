"""Overload: goodput under 4x the sustainable load, with clients that retry as the SDK does.

    .venv/bin/python bench/bench_overload.py [--seconds 15] [--rounds 3] [--client-cpus 1]

1. Peak: 32 closed-loop clients (one medium text per call, bare gRPC stubs) for a window: the
   sustainable rate. Once, for reference, the same through ``SIEAsyncClient``.
2. Rounds: an overload window, then a peak window again. In each overload window calls arrive
   open-loop at 4x the first peak, each through ``SIEAsyncClient`` (gRPC), which retries
   QUEUE_FULL honouring the server's hint. Measured: goodput (calls completed per second, inside
   the window) against the mean of the peak windows just before and after it (the host drifts
   by 10-15% between windows minutes apart, and a bracket cancels it), how fast refusals come
   (bare calls without retries arriving at a tenth of the offered rate on top of it, and the
   server's QUEUE_FULL count), the health check's latency and that it stays SERVING, and the CPU
   seconds the server and this load generator spent in the round (the window, then the calls
   still waiting). The result is the median over the rounds, and the lowest.
3. Recovery: 8 closed-loop clients before the first round and after the last; their p50s.

``--transport http`` runs the same through the HTTP bridge, started beside the server on the
server's CPUs: the bare calls are msgpack POSTs (a refusal is a 503 ``QUEUE_FULL``) and the SDK
clients speak HTTP; the health checks and counters still read the server over gRPC.

The server runs with ``--max-pending-items 256`` so that what it admits finishes within seconds,
on its own CPUs: this load generator keeps the last ``--client-cpus`` (1) of them, as clients on
other machines would (0: both share all CPUs). Beside every window the bench reads the server's
counters: the items the model computed a second, its mean batch and padding, and the server's
CPU. Goodput counts the bare calls admitted too. Ratios from one run; the result lands in
bench/results/overload-<time>.json, with the server's RSS before the first round and after the
last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
from bench_common import MODEL, ROOT
from bench_server import Counters, cpu_delta, proc_cpu_s, read_counters
from bench_services import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk import SIEAsyncClient
from sie_sdk.client._throttle import DEFAULT_RATIO
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, status_pb2, status_pb2_grpc
from sie_sdk.wire import MSGPACK, pack_msgpack

T = TypeVar("T")
MEDIUM = json.loads((ROOT / "bench/data/bench-texts.json").read_text())["medium"]


async def sdk_closed_loop(url: str, clients: int, seconds: float, throttle: float) -> int:
    """Calls completed inside the window by ``clients`` closed loops of ``SIEAsyncClient`` on
    ``url`` (a gRPC address, or the bridge's ``http://`` URL)."""
    completed = 0
    end = time.monotonic() + seconds
    async with SIEAsyncClient(url, timeout_s=60, throttle_ratio=throttle) as sdk:

        async def client(n: int) -> None:
            nonlocal completed
            i = n
            while time.monotonic() < end:
                await sdk.encode(MODEL, {"text": MEDIUM[i % len(MEDIUM)]})
                completed += time.monotonic() <= end
                i += clients

        await asyncio.gather(*(client(n) for n in range(clients)))
    return completed


@dataclass(frozen=True)
class Target:
    """Where the load goes: the server's gRPC address (counters, health; the calls too over
    gRPC), and the bridge's URL when the calls go through it."""

    address: str
    bridge_url: str | None = None

    @property
    def sdk_url(self) -> str:
        return self.bridge_url or self.address


class Refused(Exception):
    """A bare call answered QUEUE_FULL."""


@contextlib.asynccontextmanager
async def bare_calls(target: Target) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    """One-text encode calls without retries, over the target's transport; ``Refused`` for a
    QUEUE_FULL answer, any other failure raised as it comes."""
    if target.bridge_url is None:
        async with grpc.aio.insecure_channel(target.address) as channel:
            stub = encode_pb2_grpc.EncodeServiceStub(channel)

            async def over_grpc(text: str) -> None:
                request = encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=text)])
                try:
                    await stub.Encode(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise Refused from None
                    raise

            yield over_grpc
        return
    url = f"{target.bridge_url}/v1/encode/{MODEL}"
    headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def over_http(text: str) -> None:
            body = pack_msgpack({"items": [{"text": text}]})
            async with session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
            if response.status == 503 and b"QUEUE_FULL" in raw:
                raise Refused
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {raw[:200]!r}")

        yield over_http


async def closed_loop(target: Target, clients: int, seconds: float) -> list[float]:
    """Latencies (ms) of calls completed inside the window."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    async with bare_calls(target) as encode:

        async def client(n: int) -> None:
            i = n
            while time.monotonic() < end:
                started = time.perf_counter()
                await encode(MEDIUM[i % len(MEDIUM)])
                if time.monotonic() <= end:
                    latencies.append((time.perf_counter() - started) * 1000)
                i += clients

        await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies


async def overload(target: Target, rate: float, seconds: float, throttle: float) -> dict[str, Any]:
    done: list[float] = []
    failed: list[str] = []
    health_ms: list[float] = []
    refusal_ms: list[float] = []
    probe_admitted = probe_admitted_in_window = 0
    not_serving = 0
    end = time.monotonic() + seconds
    rng = random.Random(7)
    async with SIEAsyncClient(target.sdk_url, timeout_s=60, throttle_ratio=throttle) as sdk:

        async def call(i: int) -> None:
            try:
                await sdk.encode(MODEL, {"text": MEDIUM[i % len(MEDIUM)]}, provision_timeout_s=60)
            except Exception as exc:
                failed.append(type(exc).__name__)
                return
            if time.monotonic() <= end:
                done.append(time.monotonic())

        async def arrivals() -> list[asyncio.Task[None]]:
            tasks, i = [], 0
            while time.monotonic() < end:
                tasks.append(asyncio.create_task(call(i)))
                i += 1
                await asyncio.sleep(rng.expovariate(rate))
            return tasks

        async def probe() -> None:
            nonlocal not_serving
            async with grpc.aio.insecure_channel(target.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while time.monotonic() < end:
                    started = time.perf_counter()
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    health_ms.append((time.perf_counter() - started) * 1000)
                    not_serving += reply.status != health_pb2.HealthCheckResponse.SERVING
                    await asyncio.sleep(0.1)

        async def probe_call(encode: Callable[[str], Awaitable[None]], i: int) -> None:
            """A bare call, no retries: how long its answer takes when it is a refusal."""
            nonlocal probe_admitted, probe_admitted_in_window
            started = time.perf_counter()
            try:
                await encode(MEDIUM[i % len(MEDIUM)])
                probe_admitted += 1
                probe_admitted_in_window += time.monotonic() <= end
            except Refused:
                refusal_ms.append((time.perf_counter() - started) * 1000)
            except Exception as exc:
                failed.append(f"bare {type(exc).__name__}")

        async def refusal_probe() -> None:
            """Bare calls arriving like the others (a tenth of the offered rate) into the same
            overload: the latency of the refusals among them."""
            probes: list[asyncio.Task[None]] = []
            async with bare_calls(target) as encode:
                i = 0
                while time.monotonic() < end:
                    probes.append(asyncio.create_task(probe_call(encode, i)))
                    i += 1
                    await asyncio.sleep(rng.expovariate(rate / 10))
                await asyncio.gather(*probes)

        tasks, _, _ = await asyncio.gather(arrivals(), probe(), refusal_probe())
        offered = len(tasks)
        await asyncio.gather(*tasks)
    return {
        "offered_calls": offered,
        "goodput_per_s": (len(done) + probe_admitted_in_window) / seconds,
        "sdk_goodput_per_s": len(done) / seconds,
        "failed": len(failed),
        "failed_kinds": sorted(set(failed)),
        "health_p99_ms": statistics.quantiles(health_ms, n=100)[98] if len(health_ms) > 2 else None,
        "health_not_serving": not_serving,
        "probe_calls_refused": len(refusal_ms),
        "probe_calls_admitted": probe_admitted,
        "refusal_p50_ms": statistics.median(refusal_ms) if refusal_ms else None,
        "refusal_p99_ms": (
            statistics.quantiles(refusal_ms, n=100)[98] if len(refusal_ms) > 2 else None
        ),
    }


def model_rates(delta: Counters, seconds: float, cpu_s: float | None) -> dict[str, Any]:
    """What the model did in a phase: items it computed a second, its batches, their padding,
    and the server's CPU (cores) meanwhile."""
    return {
        "items_computed_per_s": delta.batched_items / seconds,
        "mean_batch": delta.batched_items / delta.batches if delta.batches else None,
        "padding": 1.0 - delta.tokens / delta.padded_tokens if delta.padded_tokens else None,
        "server_cores": cpu_s / seconds if cpu_s is not None else None,
    }


async def window_rates(
    address: str, pid: int, seconds: float, edge_s: float = 0.0
) -> dict[str, Any]:
    """``model_rates`` over the next ``seconds`` (run beside the phase's load), leaving
    ``edge_s`` out at each end (clients starting, the last calls draining)."""
    await asyncio.sleep(edge_s)
    span = seconds - 2 * edge_s
    before, cpu_before = await read_counters(address), proc_cpu_s(pid)
    await asyncio.sleep(span)
    after, cpu_after = await read_counters(address), proc_cpu_s(pid)
    return model_rates(after - before, span, cpu_delta(cpu_before, cpu_after))


async def measured(
    load: Awaitable[T], address: str, pid: int, seconds: float
) -> tuple[T, dict[str, Any]]:
    """Run the phase ``load`` with ``window_rates`` beside it."""
    result, rates = await asyncio.gather(load, window_rates(address, pid, seconds))
    return result, rates


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def queue_full_count(address: str) -> int:
    """Requests the server answered QUEUE_FULL (its ``sie_requests_total`` counter)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = status_pb2_grpc.StatusServiceStub(channel).WatchStatus(
            status_pb2.WatchStatusRequest(), timeout=10
        )
        try:
            reply = await call.read()
        finally:
            call.cancel()
    assert isinstance(reply, status_pb2.WatchStatusResponse)
    return sum(
        c.value
        for c in reply.counters
        if c.name == "sie_requests_total" and c.labels.get("status") == "QUEUE_FULL"
    )


def split_cpus(client_cpus: int) -> tuple[set[int], set[int]]:
    """The CPUs of the server and of this load generator: the generator takes the last
    ``client_cpus`` of this process's CPUs, the server the rest (0: both share all of them)."""
    cpus = sorted(os.sched_getaffinity(0))
    if client_cpus <= 0:
        return set(cpus), set(cpus)
    if client_cpus >= len(cpus):
        raise SystemExit(f"--client-cpus {client_cpus} leaves no CPU of {len(cpus)} to the server")
    return set(cpus[:-client_cpus]), set(cpus[-client_cpus:])


def start_server(cpus: set[int]) -> tuple[subprocess.Popen[bytes], str]:
    """The server, on ``cpus`` (torch sizes its thread pool to them)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "sie_server", "--host", "127.0.0.1", "--port", str(port),
            "--preload", MODEL, "--device", "cpu", "--max-pending-items", "256",
        ],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )  # fmt: skip
    address = f"127.0.0.1:{port}"

    async def ready() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("the server never became ready")

    asyncio.run(ready())
    return process, address


def start_bridge(address: str, cpus: set[int]) -> tuple[subprocess.Popen[bytes], str]:
    """The HTTP bridge in front of ``address``, on the server's ``cpus``; (process, base URL)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "sie_bridge", "--host", "127.0.0.1", "--port", str(port),
            "--backend", address,
        ],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("the bridge never became ready")


def overload_round(
    target: Target, pid: int, rate: float, seconds: float, throttle: float
) -> dict[str, Any]:
    """One overload window at ``rate`` calls a second, with the server's counters beside it."""
    address = target.address
    refused_before = asyncio.run(queue_full_count(address))
    cpu_before = proc_cpu_s(pid)
    own_before = time.process_time()
    over, over_model = asyncio.run(
        measured(overload(target, rate, seconds, throttle), address, pid, seconds)
    )
    over["server_cpu_s"] = cpu_delta(cpu_before, proc_cpu_s(pid))
    over["load_generator_cpu_s"] = time.process_time() - own_before
    over["queue_full_answers"] = asyncio.run(queue_full_count(address)) - refused_before
    over["model_in_overload_window"] = over_model
    return over


def peak_window(target: Target, pid: int, seconds: float) -> dict[str, Any]:
    """32 closed-loop bare clients: the sustainable rate now, with the server's counters."""
    latencies, model = asyncio.run(
        measured(closed_loop(target, 32, seconds), target.address, pid, seconds)
    )
    return {"per_s": len(latencies) / seconds, "model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=15.0, help="each window's length")
    parser.add_argument(
        "--rounds", type=int, default=3, help="overload windows, each between two peak windows"
    )
    parser.add_argument(
        "--client-cpus", type=int, default=1,
        help="CPUs kept for this load generator, away from the server (0: they share all)",
    )  # fmt: skip
    parser.add_argument(
        "--throttle-ratio", type=float, default=DEFAULT_RATIO,
        help="the SDK clients' client-side throttling (0: off; sie_sdk.client._throttle)",
    )  # fmt: skip
    parser.add_argument(
        "--warm-up", type=float, default=15.0, help="seconds of load before the peak"
    )
    parser.add_argument(
        "--transport", choices=("grpc", "http"), default="grpc",
        help="the calls' transport (http: through a bridge beside the server, on its CPUs)",
    )  # fmt: skip
    args = parser.parse_args()
    server_cpus, client_cpus = split_cpus(args.client_cpus)
    server, address = start_server(server_cpus)
    front = start_bridge(address, server_cpus) if args.transport == "http" else None
    target = Target(address, front[1] if front else None)
    os.sched_setaffinity(0, client_cpus)
    try:
        # Warmed up for 15 s (5 s in runs before overload-20261128-044244): two peak windows in
        # a row still differ by up to 13% on this shared host, hence the bracketing below.
        asyncio.run(closed_loop(target, 32, args.warm_up))
        sdk_peak = (
            asyncio.run(sdk_closed_loop(target.sdk_url, 32, args.seconds, args.throttle_ratio))
            / args.seconds
        )
        before = asyncio.run(closed_loop(target, 8, args.seconds / 2))
        rss_before = rss_mb(server.pid)
        bridge_rss_before = rss_mb(front[0].pid) if front else None
        peaks = [peak_window(target, server.pid, args.seconds)]
        # The same offered load in every round: 4x the first peak.
        offered = 4 * peaks[0]["per_s"]
        rounds: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            over = overload_round(target, server.pid, offered, args.seconds, args.throttle_ratio)
            peaks.append(peak_window(target, server.pid, args.seconds))
            bracket = (peaks[-2]["per_s"] + peaks[-1]["per_s"]) / 2
            over["goodput_over_bracketing_peaks"] = over["goodput_per_s"] / bracket
            rounds.append(over)
        rss_after = rss_mb(server.pid)
        bridge_rss_after = rss_mb(front[0].pid) if front else None
        after = asyncio.run(closed_loop(target, 8, args.seconds / 2))
    finally:
        if front is not None:
            front[0].terminate()
            front[0].wait(60)
        server.terminate()
        server.wait(60)
    ratios = [r["goodput_over_bracketing_peaks"] for r in rounds]
    result = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "transport": args.transport,
        "server_env": {k: v for k, v in os.environ.items() if k.startswith("SIE_")},
        "server_cpus": sorted(server_cpus),
        "load_generator_cpus": sorted(client_cpus),
        "throttle_ratio": args.throttle_ratio,
        "warm_up_s": args.warm_up,
        "window_s": args.seconds,
        "offered_per_s": offered,
        "sdk_peak_per_s": sdk_peak,
        "peaks": peaks,
        "rounds": rounds,
        # Each overload window against the mean of the peak windows just before and after it,
        # so that the host's drift between windows cancels; the median over the rounds.
        "goodput_over_peak_median": statistics.median(ratios),
        "goodput_over_peak_min": min(ratios),
        "failed": sum(r["failed"] for r in rounds),
        "health_not_serving": sum(r["health_not_serving"] for r in rounds),
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
        "bridge_rss_mb_before": bridge_rss_before,
        "bridge_rss_mb_after": bridge_rss_after,
        "p50_ms_8_clients_before": statistics.median(before),
        "p50_ms_8_clients_after": statistics.median(after),
    }
    out = ROOT / "bench/results" / f"overload-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
