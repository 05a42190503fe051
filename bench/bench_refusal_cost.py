"""What refused calls cost the model: items it computes a second with and without a stream of
calls the server answers at once with an error, at a small and a deep queue.

    .venv/bin/python bench/bench_refusal_cost.py [--seconds 15] [--rate 150] [--rounds 2]

The server runs on its own CPUs as in ``bench_overload`` (this load generator keeps the last
one). Each cell drives ``clients`` closed-loop bare gRPC clients (one medium text per call) and,
with ``--rate``, open-loop calls to a model that does not exist at that rate (each answered
MODEL_NOT_FOUND at once: the cheapest error path, standing in for QUEUE_FULL refusals). The
server's batch counters, read over the middle of the window, give the items the model computed
a second, its mean batch and padding; the cells alternate in rounds (the host drifts). The
result lands in bench/results/refusal-cost-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import time
from typing import Any

import grpc
from bench_common import ROOT
from bench_overload import (
    MEDIUM,
    Target,
    closed_loop,
    split_cpus,
    start_server,
    window_rates,
)
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

MISSING_MODEL = "bench/no-such-model"
#: Seconds left out at each end of a window (clients starting, the last calls draining).
EDGE_S = 1.0


async def errors_at(address: str, rate: float, seconds: float) -> int:
    """Calls to a missing model arriving at ``rate`` for ``seconds``: how many were answered
    with an error (all of them, unless the server is broken)."""
    end = time.monotonic() + seconds
    rng = random.Random(1)
    answered = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encode_pb2_grpc.EncodeServiceStub(channel)
        request = encode_pb2.EncodeRequest(
            model=MISSING_MODEL, items=[common_pb2.Item(text=MEDIUM[0])]
        )

        async def one() -> None:
            nonlocal answered
            try:
                await stub.Encode(request, timeout=30)
            except grpc.aio.AioRpcError:
                answered += 1

        calls = []
        while time.monotonic() < end:
            calls.append(asyncio.create_task(one()))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*calls)
    return answered


async def cell(address: str, pid: int, clients: int, rate: float, seconds: float) -> dict[str, Any]:
    """One cell: the model's rates over the window, ``clients`` closed loops, and error calls at
    ``rate`` a second (0: none)."""
    loads: list[Any] = [
        window_rates(address, pid, seconds, EDGE_S),
        closed_loop(Target(address), clients, seconds),
    ]
    if rate > 0:
        loads.append(errors_at(address, rate, seconds))
    outcome = await asyncio.gather(*loads)
    return {"clients": clients, "error_calls_per_s": rate, **outcome[0],
            "errors_answered": outcome[2] if rate > 0 else 0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=150.0, help="error calls a second")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 256])
    args = parser.parse_args()
    server_cpus, client_cpus = split_cpus(1)
    server, address = start_server(server_cpus)
    os.sched_setaffinity(0, client_cpus)
    cells: list[dict[str, Any]] = []
    try:
        asyncio.run(closed_loop(Target(address), 32, 15))  # warm up
        for round_ in range(args.rounds):
            for clients in args.clients:
                for rate in (0.0, args.rate):
                    row = asyncio.run(cell(address, server.pid, clients, rate, args.seconds))
                    row["round"] = round_
                    cells.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    summary = {}
    for clients in args.clients:

        def mean(rate: float, c: int = clients) -> float:
            rows = [r for r in cells if r["clients"] == c and r["error_calls_per_s"] == rate]
            return float(sum(r["items_computed_per_s"] for r in rows)) / len(rows)

        summary[str(clients)] = mean(args.rate) / mean(0.0)
    result = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "server_cpus": sorted(server_cpus),
        "load_generator_cpus": sorted(client_cpus),
        "cells": cells,
        "items_per_s_with_errors_over_without": summary,
    }
    out = ROOT / "bench/results" / f"refusal-cost-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
