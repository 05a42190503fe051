"""Collation's cost: ``pad_ids`` (numpy, handed to torch without a copy) against padding with a
torch operator per row (how ``pad_ids`` filled its tensors until 2026-11-29), on token rows of
the bench corpus's lengths, in process, one torch thread (as in the prep pool).

    .venv/bin/python bench/bench_collate.py [--repeat 5]

Collation runs in the prep pool while the model runs, holding the GIL that the event loop and
the model thread want, so its cost is taken from them. Each shape is timed alternately, best of
``--repeat``; the result (microseconds a batch, and the ratio) lands in
bench/results/collate-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import random
import timeit
from collections.abc import Callable, Sequence
from typing import Any

import torch
from bench_common import ROOT
from sie_server.adapters.hf import pad_ids

#: (rows, tokens of the longest): a lone short text, a server batch of medium texts at 32
#: clients (docs/performance.md: 8-14 items), a full batch of long texts.
SHAPES = [(1, 16), (14, 85), (32, 85), (64, 256)]


def pad_per_row(rows: Sequence[Sequence[int]], pad_id: int, device: str) -> Any:
    """The reference: torch tensors filled one row at a time."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def best_us(fn: Callable[[], Any], repeat: int, number: int = 200) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timings per shape (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    results = []
    for count, longest in SHAPES:
        rows = [
            [rng.randrange(30_000) for _ in range(rng.randint(longest * 3 // 4, longest))]
            for _ in range(count)
        ]
        ours, reference = pad_ids(rows, 0, "cpu"), pad_per_row(rows, 0, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
        numpy_us = best_us(functools.partial(pad_ids, rows, 0, "cpu"), args.repeat)
        torch_us = best_us(functools.partial(pad_per_row, rows, 0, "cpu"), args.repeat)
        results.append({"rows": count, "longest": longest, "pad_ids_us": round(numpy_us, 1),
                        "per_row_torch_us": round(torch_us, 1),
                        "ratio": round(torch_us / numpy_us, 2)})  # fmt: skip
        print(f"{count:3d} rows x {longest:3d} tokens: pad_ids {numpy_us:8.1f} us, "
              f"per-row torch {torch_us:8.1f} us ({torch_us / numpy_us:.1f}x)")  # fmt: skip
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = ROOT / "bench" / "results" / f"collate-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                "results": results}, indent=2))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
