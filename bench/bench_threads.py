"""One compute thread for every model against a thread per model (``--model-threads``), on a
CPU server holding two models, as most deployments do (an embedder and a reranker).

    .venv/bin/python bench/bench_threads.py [--rounds 3] [--seconds 15]

torch's OpenMP runtime (libgomp) gives every thread that runs a parallel region a team of worker
threads for as long as that thread lives, and once the process holds more of them than it has
cores, every team's workers sleep at each barrier instead of spinning (engine/model_thread.py).
Each server here preloads all-MiniLM-L6-v2 and loads a random-weight cross-encoder of
ms-marco-MiniLM-L-6-v2's size (``bench_tasks.ScoreWorkload``), then serves two cells, one model
at a time while the other stays loaded:

* score: 8 closed-loop clients, one query and 8 documents a call (pairs/s);
* encode: 32 closed-loop clients, one medium text a call (texts/s).

For each cell it reads the server's CPU (cores) and its threads' sleeps a second and the two
busiest threads' CPU from ``/proc``. Servers with ``shared`` and ``per-model`` alternate in
rounds (the host drifts); the ratio of each round is shared over per-model, and the result lands
in bench/results/threads-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench_closed import GrpcCaller, closed_loop
from bench_common import ROOT
from bench_server import ServerProcess, thread_times
from bench_tasks import ScoreWorkload, TaskCaller, env, first_call, quiet_transformers
from encode_bench import load_corpus

MODES = ("shared", "per-model")
WARM_S = 3.0
#: (cell, clients)
CELLS = (("score", 8), ("encode", 32))


async def measure(server: ServerProcess, caller: Any, requests: list[list[str]], clients: int,
                  seconds: float, per_call: int) -> dict[str, Any]:  # fmt: skip
    zeros = [0] * len(requests)
    await closed_loop(caller, requests, zeros, clients, WARM_S, 0.0)
    before, wall0 = thread_times(server.pid), time.perf_counter()
    out = await closed_loop(caller, requests, zeros, clients, 0.0, seconds)
    wall = time.perf_counter() - wall0
    after = thread_times(server.pid)
    cpu = {t: after[t].cpu_s - (before[t].cpu_s if t in before else 0.0) for t in after}
    sleeps = sum(after[t].sleeps - (before[t].sleeps if t in before else 0) for t in after)
    busiest = sorted(cpu.values(), reverse=True)[:2]
    return {
        "items_per_s": out.completed * per_call / out.window_s,
        "server_cores": sum(cpu.values()) / wall,
        "busiest_threads_cores": [round(c / wall, 3) for c in busiest],
        "sleeps_per_s": sleeps / wall,
        "errors": out.errors,
    }


async def serve(server: ServerProcess, score: ScoreWorkload, medium: list[list[str]],
                seconds: float) -> dict[str, Any]:  # fmt: skip
    score_caller = TaskCaller(score, server.address)
    encode_caller = GrpcCaller(server.address)
    try:
        await first_call(score_caller, score.requests[0])  # loads and warms the cross-encoder
        cells: dict[str, Any] = {}
        for name, clients in CELLS:
            if name == "score":
                cells[name] = await measure(server, score_caller, score.requests, clients,
                                            seconds, score.items_per_call)  # fmt: skip
            else:
                cells[name] = await measure(server, encode_caller, medium, clients, seconds, 1)
        return cells
    finally:
        await score_caller.close()
        await encode_caller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--corpus", type=Path, default=ROOT / "bench/data/bench-texts.json")
    args = parser.parse_args()
    from sie_server.catalog import BUILTIN_CATALOG_DIR

    quiet_transformers()
    corpus = load_corpus(args.corpus)
    medium = [[t] for t in corpus["medium"]]
    score = ScoreWorkload(corpus)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sie-bench-threads-") as tmp:
        catalog = Path(tmp) / "catalog"
        catalog.mkdir()
        entry = score.build(Path(tmp) / "score")
        (catalog / "score.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                with (
                    env("SIE_MODELS_DIR", f"{BUILTIN_CATALOG_DIR},{catalog}"),
                    env("SIE_MODEL_THREADS", mode),
                ):
                    server = ServerProcess("float32")
                try:
                    server.wait_ready()
                    cells = asyncio.run(serve(server, score, medium, args.seconds))
                finally:
                    server.terminate()
                    server.wait_exit()
                runs.append({"round": round_, "mode": mode, "cells": cells})
                print(f"round {round_} {mode:9}: " + "; ".join(
                    f"{c} {v['items_per_s']:.1f}/s, {v['server_cores']:.2f} cores, "
                    f"{v['sleeps_per_s']:.0f} sleeps/s" for c, v in cells.items()
                ), flush=True)  # fmt: skip
    ratios = {
        name: [
            a["cells"][name]["items_per_s"] / b["cells"][name]["items_per_s"]
            for r in range(args.rounds)
            for a in runs
            for b in runs
            if a["round"] == b["round"] == r and a["mode"] == "shared" and b["mode"] == "per-model"
        ]
        for name, _ in CELLS
    }
    summary = {name: statistics.median(v) for name, v in ratios.items()}
    for name, values in ratios.items():
        print(f"{name}: shared / per-model {summary[name]:.2f} (rounds "
              f"{', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = ROOT / f"bench/results/threads-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args) | {"corpus": str(args.corpus)},
                               "cells": dict(CELLS), "runs": runs, "ratios": ratios,
                               "median_ratio": summary}, indent=2))  # fmt: skip
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
