"""Bulk streaming encode against unary calls, and what a bulk stream costs interactive callers.

    .venv/bin/python bench/bench_stream.py [--seconds 10] [--rounds 3]
        [--texts-per-request 8,64] [--out FILE]

One server (``python -m sie_server``, the embedded MiniLM, fp32) and, in one run, for each size
of ``--texts-per-request``:

1. **Unary**: ``CONCURRENCY`` closed-loop gRPC clients, each sending requests of that many short
   texts (texts/s).
2. **Stream**: one ``EncodeStream`` with ``window = CONCURRENCY`` (the same requests in flight),
   the client holding at most ``2 * window`` unanswered as the SDK does (texts/s). Target
   (issue 20): stream >= unary.

Then **interactive p50**: one client sending one short text at a time, alone (idle p50), then
while a bulk stream of ``BATCH`` texts a request runs. Target: p50 under the stream <= 2x idle.

Short texts (~16 tokens) from the bench corpus. Both throughput phases run for the same window,
after an untimed round of each (a fresh server builds kernels for new batch shapes), ``--rounds``
times, alternating which goes first; the stream / unary figure is the median of the rounds'
ratios. Only ratios measured here, side by side in one run, mean anything.
The result is JSON (bench/results/stream-<time>.json, or ``--out``) and a few lines of text.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from bench_common import CALL_TIMEOUT_S, MODEL, ROOT, percentile
from bench_server import ServerProcess
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

CONCURRENCY = 4
#: Texts per request of the bulk stream under which the interactive p50 is measured.
BATCH = 64
#: Texts per request of the throughput rows: per-request costs show at 8, compute rules at 64.
SIZES = (8, 64)
WARM_S = 2.0


def corpus() -> list[str]:
    data = json.loads((ROOT / "bench" / "data" / "bench-texts.json").read_text())
    return list(data["short"])


def request(texts: Sequence[str], start: int, count: int) -> encode_pb2.EncodeRequest:
    items = [common_pb2.Item(text=texts[(start + i) % len(texts)]) for i in range(count)]
    return encode_pb2.EncodeRequest(model=MODEL, items=items)


async def unary_rate(stub: Any, texts: Sequence[str], seconds: float, batch: int) -> float:
    """Texts/s of CONCURRENCY closed-loop clients, each ``batch`` texts per call."""
    done = 0
    counting = False

    async def client(index: int) -> None:
        nonlocal done
        position = index * batch
        while not stopping:
            reply = await stub.Encode(request(texts, position, batch), timeout=CALL_TIMEOUT_S)
            position += CONCURRENCY * batch
            if counting:
                done += len(reply.items)

    stopping = False
    tasks = [asyncio.create_task(client(i)) for i in range(CONCURRENCY)]
    await asyncio.sleep(WARM_S)
    counting, started = True, time.perf_counter()
    await asyncio.sleep(seconds)
    counting, elapsed = False, time.perf_counter() - started
    stopping = True
    await asyncio.gather(*tasks)
    return done / elapsed


def unanswered() -> asyncio.Semaphore:
    """The messages a stream may have sent and not had answered: ``2 * window``, as the SDK's
    ``encode_stream`` (``max_unacked``). Without a bound the client builds and buffers requests
    as fast as HTTP/2 flow control lets it, which costs this machine's cores."""
    return asyncio.Semaphore(2 * CONCURRENCY)


async def stream_messages(
    texts: Sequence[str], stop: asyncio.Event, room: asyncio.Semaphore, batch: int
) -> AsyncIterator[encode_pb2.EncodeStreamRequest]:
    """Requests of ``batch`` texts, each once ``room`` has a slot (released by each answer)."""
    sequence = 0
    while not stop.is_set():
        await room.acquire()
        sequence += 1
        yield encode_pb2.EncodeStreamRequest(
            sequence=sequence,
            request=request(texts, sequence * batch, batch),
            window=CONCURRENCY if sequence == 1 else 0,
        )


async def stream_rate(stub: Any, texts: Sequence[str], seconds: float, batch: int) -> float:
    """Texts/s of one EncodeStream with window CONCURRENCY, ``batch`` texts per request."""
    stop, room = asyncio.Event(), unanswered()
    call = stub.EncodeStream(stream_messages(texts, stop, room, batch))
    done, counting, started = 0, False, time.perf_counter()
    warm_until = started + WARM_S
    end = warm_until + seconds
    async for answer in call:
        room.release()
        if answer.WhichOneof("result") != "response":
            raise RuntimeError(f"stream error: {answer.error.reason} {answer.error.message}")
        now = time.perf_counter()
        if not counting and now >= warm_until:
            counting, started = True, now
        elif counting:
            done += len(answer.response.items)
        if now >= end:
            stop.set()
            call.cancel()
            break
    return done / (time.perf_counter() - started)


PHASES = ("tokenization_ms", "queue_ms", "inference_ms", "postprocessing_ms")
#: The server's timing breakdown (median ms per phase) of the last ``interactive_p50`` run.
last_breakdown: dict[str, float] = {}


async def interactive_p50(stub: Any, texts: Sequence[str], seconds: float) -> float:
    """p50 ms of one client sending one short text at a time for ``seconds``; the server's
    median timing per phase goes to ``last_breakdown``."""
    latencies: list[float] = []
    phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    end = time.perf_counter() + seconds
    position = 0
    while time.perf_counter() < end:
        sent = time.perf_counter()
        reply = await stub.Encode(request(texts, position, 1), timeout=CALL_TIMEOUT_S)
        latencies.append((time.perf_counter() - sent) * 1000.0)
        for phase in PHASES:
            phases[phase].append(getattr(reply.timing, phase))
        position += 1
    last_breakdown.clear()
    last_breakdown.update({phase: percentile(v, 50) for phase, v in phases.items()})
    return percentile(latencies, 50)


async def p50_under_stream(stub: Any, texts: Sequence[str], seconds: float) -> tuple[float, float]:
    """(interactive p50 ms while a bulk stream runs, the stream's texts/s meanwhile)."""
    stop = asyncio.Event()
    room = unanswered()
    call = stub.EncodeStream(stream_messages(texts, stop, room, BATCH))
    streamed = 0

    async def drain() -> None:
        nonlocal streamed
        async for answer in call:
            room.release()
            streamed += len(answer.response.items)

    reader = asyncio.create_task(drain())
    await asyncio.sleep(WARM_S)
    before, started = streamed, time.perf_counter()
    p50 = await interactive_p50(stub, texts, seconds)
    rate = (streamed - before) / (time.perf_counter() - started)
    stop.set()
    call.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    return p50, rate


async def throughput(
    stub: Any, texts: Sequence[str], seconds: float, rounds: int, batch: int
) -> dict[str, Any]:
    """Unary and stream texts/s at ``batch`` texts per request, ``rounds`` times alternated."""
    # A fresh server meets new batch shapes (oneDNN builds kernels for each): one untimed
    # round of each kind first, so neither phase pays for it.
    await unary_rate(stub, texts, WARM_S, batch)
    await stream_rate(stub, texts, WARM_S, batch)
    unary_rates: list[float] = []
    stream_rates: list[float] = []
    for round_ in range(rounds):
        # Alternate which goes first, so a drift of the machine favours neither.
        order = ("unary", "stream") if round_ % 2 == 0 else ("stream", "unary")
        for kind in order:
            if kind == "unary":
                unary_rates.append(await unary_rate(stub, texts, seconds, batch))
                print(f"round {round_ + 1}: unary, {CONCURRENCY} clients x {batch} texts: "
                      f"{unary_rates[-1]:.1f} texts/s", flush=True)  # fmt: skip
            else:
                stream_rates.append(await stream_rate(stub, texts, seconds, batch))
                print(f"round {round_ + 1}: stream, window {CONCURRENCY} x {batch} texts: "
                      f"{stream_rates[-1]:.1f} texts/s", flush=True)  # fmt: skip
    ratios = [s / u for s, u in zip(stream_rates, unary_rates, strict=True)]
    return {
        "unary_texts_per_s": unary_rates,
        "stream_texts_per_s": stream_rates,
        "stream_over_unary_per_round": ratios,
        "stream_over_unary": statistics.median(ratios),
    }


async def measure(
    address: str, seconds: float, rounds: int, sizes: Sequence[int]
) -> dict[str, Any]:
    texts = corpus()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encode_pb2_grpc.EncodeServiceStub(channel)
        await stub.Encode(request(texts, 0, BATCH), timeout=CALL_TIMEOUT_S)
        rows = {size: await throughput(stub, texts, seconds, rounds, size) for size in sizes}
        idle = await interactive_p50(stub, texts, seconds)
        idle_phases = dict(last_breakdown)
        print(f"interactive p50 alone: {idle:.1f} ms, server {idle_phases}", flush=True)
        busy, meanwhile = await p50_under_stream(stub, texts, seconds)
        busy_phases = dict(last_breakdown)
        print(f"interactive p50 under a bulk stream: {busy:.1f} ms, server {busy_phases} "
              f"(stream meanwhile {meanwhile:.1f} texts/s)", flush=True)  # fmt: skip
    return {
        "throughput_by_texts_per_request": rows,
        "interactive_p50_idle_ms": idle,
        "interactive_p50_under_stream_ms": busy,
        "interactive_server_ms_idle": idle_phases,
        "interactive_server_ms_under_stream": busy_phases,
        "p50_ratio": busy / idle,
        "stream_texts_per_s_meanwhile": meanwhile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="window of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="unary/stream rounds, alternated")
    parser.add_argument(
        "--texts-per-request",
        default=",".join(map(str, SIZES)),
        help="comma-separated texts per request of the throughput rows (both kinds)",
    )
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    sizes = [int(size) for size in args.texts_per_request.split(",")]
    started = dt.datetime.now(dt.UTC)
    server = ServerProcess("float32")
    try:
        server.wait_ready()
        result = asyncio.run(measure(server.address, args.seconds, args.rounds, sizes))
    finally:
        server.terminate()
        exit_code = server.wait_exit()
    result.update(
        {
            "started_at": started.isoformat(timespec="seconds"),
            "model": MODEL,
            "concurrency": CONCURRENCY,
            "bulk_texts_per_request": BATCH,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "server_exit_code": exit_code,
            "targets": {
                f"stream >= unary at {size} texts a request": row["stream_over_unary"] >= 1.0
                for size, row in result["throughput_by_texts_per_request"].items()
            }
            | {
                "p50 under stream <= 2x idle": result["p50_ratio"] <= 2.0,
            },
        }
    )
    out = args.out or ROOT / "bench" / "results" / f"stream-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ratios = ", ".join(
        f"{size} texts {row['stream_over_unary']:.2f}x"
        for size, row in result["throughput_by_texts_per_request"].items()
    )
    print(f"stream / unary: {ratios}; interactive p50 under stream "
          f"{result['p50_ratio']:.2f}x idle; wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
