"""A catalog entry's arrival window (``batch_wait_ms``) on a large model, side by side in one run.

    .venv/bin/python bench/bench_window.py [--wait-ms 100] [--clients 8,32] [--rounds 3]
        [--seconds 20] [--out FILE]

One server serves the same random-weight bge-m3-size model (``bench_tasks.BgeM3Workload``: 24
layers, hidden 1024, dense + sparse + multivector from one pass) under two catalog names: one
with no window, one with ``batch_wait_ms``. On the CPU both share one compute thread, so each
cell runs alone. For each concurrency and round, both names are measured in turn with
closed-loop gRPC clients sending one short text a call (``bench_tasks.task_cell``: texts/s,
p50/p99 and the server's mean batch), the order alternating between rounds so that a drift of
the host favours neither. The result is JSON (bench/results/window-<time>.json, or ``--out``)
with every cell and the median ratio per concurrency; only ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from bench_common import ROOT
from bench_server import ServerProcess
from bench_tasks import (
    BGE_M3,
    BgeM3Workload,
    TaskCaller,
    TaskProfile,
    env,
    first_call,
    quiet_transformers,
    task_cell,
)
from encode_bench import load_corpus
from sie_server.catalog import BUILTIN_CATALOG_DIR

PLAIN, WINDOW = "bench/bge-m3-random", "bench/bge-m3-random-window"


def profile(seconds: float, clients: tuple[int, ...]) -> TaskProfile:
    """The cell settings ``task_cell`` reads (the window is ``seconds``, never skipped)."""
    return TaskProfile(
        "window", seconds, seconds, 4.0, 0.0, clients, (), 1, BGE_M3, (32,)
    )  # fmt: skip


async def measure(
    server: ServerProcess, workloads: dict[str, BgeM3Workload], args: argparse.Namespace
) -> list[dict[str, Any]]:
    callers = {name: TaskCaller(w, server.address) for name, w in workloads.items()}
    settings = profile(args.seconds, args.clients)
    cells: list[dict[str, Any]] = []
    try:
        for caller in callers.values():  # the server loads each name on its first call
            await first_call(caller, caller.workload.requests[0])
        for conc in args.clients:
            for round_no in range(1, args.rounds + 1):
                order = [PLAIN, WINDOW] if round_no % 2 else [WINDOW, PLAIN]
                for name in order:
                    row = await task_cell(callers[name], server, conc, 4.0, args.seconds, settings)
                    cell = {"model": name, "round": round_no, **dataclasses.asdict(row)}
                    cells.append(cell)
                    print(
                        f"{conc} clients, round {round_no}, {name}: {row.items_per_s:.2f} texts/s,"
                        f" batch {row.mean_batch or 0:.1f}, p50 {row.p50_ms:.0f} ms,"
                        f" p99 {row.p99_ms:.0f} ms, errors {row.errors}",
                        flush=True,
                    )
    finally:
        for caller in callers.values():
            await caller.close()
    return cells


def summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: each round's window / no-window texts/s, and their median."""
    out: dict[str, Any] = {}
    for conc in sorted({c["concurrency"] for c in cells}):
        by = {(c["model"], c["round"]): c for c in cells if c["concurrency"] == conc}
        rounds = sorted({r for _, r in by})
        ratios = [by[WINDOW, r]["items_per_s"] / by[PLAIN, r]["items_per_s"] for r in rounds]
        out[str(conc)] = {"ratios": ratios, "median": statistics.median(ratios)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait-ms", type=float, default=100.0, help="the window of one name")
    parser.add_argument("--clients", default="8,32", help="concurrencies, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order")
    parser.add_argument("--seconds", type=float, default=20.0, help="window of a cell")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    args.clients = tuple(int(c) for c in args.clients.split(","))
    quiet_transformers()
    texts = load_corpus(ROOT / "bench" / "data" / "bench-texts.json")  # as the scoreboard
    with tempfile.TemporaryDirectory(prefix="sie-bench-window-") as tmp:
        root = Path(tmp)
        catalog = root / "catalog"
        catalog.mkdir()
        plain = BgeM3Workload(texts, BGE_M3)
        print("building the bge-m3-size model", flush=True)
        entry = plain.build(root / "bge-m3")
        window = BgeM3Workload(texts, BGE_M3)
        window.model = WINDOW
        (catalog / "plain.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
        waiting = {**entry, "name": WINDOW, "batch_wait_ms": args.wait_ms}
        (catalog / "window.yaml").write_text(yaml.safe_dump(waiting, sort_keys=False))
        with env("SIE_MODELS_DIR", f"{BUILTIN_CATALOG_DIR},{catalog}"):  # it preloads MiniLM
            server = ServerProcess("float32")
        try:
            server.wait_ready()
            cells = asyncio.run(measure(server, {PLAIN: plain, WINDOW: window}, args))
        finally:
            server.terminate()
            exit_code = server.wait_exit()
    result = {
        "wait_ms": args.wait_ms,
        "seconds": args.seconds,
        "cells": cells,
        "window_over_plain": summary(cells),
        "server_exit_code": exit_code,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    stem = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "bench" / "results" / f"window-{stem}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for conc, s in result["window_over_plain"].items():
        rounds = ", ".join(f"{r:.2f}" for r in s["ratios"])
        print(f"{conc} clients: window / no window {rounds}; median {s['median']:.2f}")
    print(f"wrote {out}")
    errors = sum(c["errors"] for c in cells)
    return 1 if errors or exit_code != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
