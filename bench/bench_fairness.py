"""Fairness: a one-text query's latency behind unary bulk requests of growing size.

    .venv/bin/python bench/bench_fairness.py [--sizes 64,256,1024] [--repeats 3] [--out FILE]

One server with the defaults (the embedded MiniLM, float32). First the query alone: the p50 of
one short text a call. Then, for each bulk size, ``--repeats`` times: one unary Encode of that
many medium texts is sent, and once it is running (``--lead-ms`` after it was sent) the same
one-text query is sent beside it. Measured: the query's latency, the bulk request's, and the
query's answer order (before the bulk's, as it should be). If batches did not interleave
requests, the query would wait for the whole bulk request ahead of it, so its latency would grow
with the bulk's size; with the server's fairness (batches formed around the request with the
fewest items waiting, ``engine/batching.py``) it stays about one batch's time over the query
alone, whatever the size. The result is JSON: bench/results/fairness-<time>.json, or ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
from bench_common import CALL_TIMEOUT_S, MODEL, ROOT, cycle
from bench_server import ServerProcess
from encode_bench import load_corpus
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

ALONE_CALLS = 20


def request(texts: list[str]) -> encode_pb2.EncodeRequest:
    return encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=t) for t in texts])


async def timed(
    stub: encode_pb2_grpc.EncodeServiceAsyncStub,
    texts: list[str],
    timeout_s: float = CALL_TIMEOUT_S,
) -> tuple[float, float]:
    """(seconds the call took, when it ended on the monotonic clock)."""
    started = time.perf_counter()
    reply = await stub.Encode(request(texts), timeout=timeout_s)
    ended = time.perf_counter()
    if len(reply.items) != len(texts):
        raise RuntimeError(f"{len(reply.items)} results for {len(texts)} texts")
    return ended - started, ended


async def measure(
    address: str, query: str, bulk_texts: list[str], sizes: list[int], repeats: int, lead_s: float
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encode_pb2_grpc.EncodeServiceStub(channel)
        for _ in range(3):  # warm-up
            await timed(stub, [query])
        alone = [(await timed(stub, [query]))[0] for _ in range(ALONE_CALLS)]
        rows = []
        for size in sizes:
            texts = cycle(bulk_texts, size)
            for _ in range(repeats):
                bulk = asyncio.create_task(timed(stub, texts, timeout_s=600.0))
                await asyncio.sleep(lead_s)
                query_s, query_end = await timed(stub, [query])
                bulk_s, bulk_end = await bulk
                rows.append(
                    {
                        "bulk_items": size,
                        "query_ms": round(query_s * 1e3, 2),
                        "bulk_ms": round(bulk_s * 1e3, 1),
                        "query_first": query_end < bulk_end,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    alone_ms = statistics.median(alone) * 1e3
    summary = {}
    for size in sizes:
        mine = [row for row in rows if row["bulk_items"] == size]
        query_ms = statistics.median(row["query_ms"] for row in mine)
        summary[str(size)] = {
            "query_p50_ms": round(query_ms, 2),
            "query_over_alone_ms": round(query_ms - alone_ms, 2),
            "bulk_p50_ms": round(statistics.median(row["bulk_ms"] for row in mine), 1),
            "query_answered_first": all(row["query_first"] for row in mine),
        }
    return {"query_alone_p50_ms": round(alone_ms, 2), "by_bulk_size": summary, "calls": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,256,1024", help="bulk request sizes, in items")
    parser.add_argument("--repeats", type=int, default=3, help="queries per bulk size")
    parser.add_argument("--lead-ms", type=float, default=300.0, help="bulk's head start")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    corpus = load_corpus(ROOT / "bench" / "data" / "bench-texts.json")
    server = ServerProcess("float32")
    try:
        server.wait_ready()
        result = asyncio.run(
            measure(
                server.address, corpus["short"][0], corpus["medium"], sizes, args.repeats,
                args.lead_ms / 1e3,
            )
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait_exit()
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "bench" / "results" / f"fairness-{stamp}.json"
    out.write_text(json.dumps({"git": git, "lead_ms": args.lead_ms, **result}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "calls"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
