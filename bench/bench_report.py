"""Targets, the summary against them, the printed table and the JSON results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from bench_baseline import BaselineResult
from bench_common import MODEL, mean
from bench_load import LoadResult

# Targets. The throughput one is parity with in-process (the brief names no number).
TARGET_THROUGHPUT_RATIO = 1.0
TARGET_LATENCY_OVERHEAD_MS = 2.0
TARGET_PADDING = 0.15


def summarize_targets(
    baselines: list[BaselineResult], loads: list[LoadResult], local_b1_p50_ms: float
) -> dict[str, Any]:
    by = {r.label: r for r in loads}
    fp32_tp = [by[k].texts_per_s for k in ("throughput #1", "throughput #2")]
    best = [b.best_texts_per_s for b in baselines]
    server_tp, local_tp = mean(fp32_tp), mean(best)
    latency = by["latency"]
    mix = by["mixed"]
    medium_padding = [
        pad for k in ("throughput #1", "throughput #2") if (pad := by[k].padding) is not None
    ]
    summary: dict[str, Any] = {
        "throughput_ratio": server_tp / local_tp,
        "throughput_ratio_range": [min(fp32_tp) / max(best), max(fp32_tp) / min(best)],
        "server_texts_per_s": server_tp,
        "in_process_best_texts_per_s": local_tp,
        "latency_overhead_p50_ms": latency.p50_ms - local_b1_p50_ms,
        "server_latency_p50_ms": latency.p50_ms,
        "server_latency_p95_ms": latency.p95_ms,
        "in_process_batch1_p50_ms": local_b1_p50_ms,
        "mixed_padding": mix.padding,
        "medium_padding": mean(medium_padding),
        "bf16_over_fp32_throughput": by["throughput bf16"].texts_per_s / server_tp
        if "throughput bf16" in by
        else None,
        "errors": sum(r.errors for r in loads),
    }
    summary["meets"] = {
        "throughput": summary["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO,
        "latency": summary["latency_overhead_p50_ms"] <= TARGET_LATENCY_OVERHEAD_MS,
        "padding": mix.padding is not None and mix.padding <= TARGET_PADDING,
    }
    return summary


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render(results: dict[str, Any]) -> str:
    s = results["summary"]
    meets = s["meets"]
    env = results["environment"]
    p = results["profile"]
    paired = results["paired_in_process_latency"]
    rows: list[tuple[str, str, str, str]] = [
        ("target", "measured", "goal", "met"),
        (
            "throughput: server / in-process best",
            f"{s['throughput_ratio']:.2f}",
            f">= {TARGET_THROUGHPUT_RATIO:.2f}",
            _verdict(meets["throughput"]),
        ),
        (
            "latency: p50 - in-process batch-1 p50",
            f"{s['latency_overhead_p50_ms']:+.2f} ms",
            f"<= {TARGET_LATENCY_OVERHEAD_MS:.1f} ms",
            _verdict(meets["latency"]),
        ),
        (
            "padding, mixed lengths (1 - tokens/padded)",
            _pct(s["mixed_padding"]),
            f"<= {_pct(TARGET_PADDING)}",
            _verdict(meets["padding"]),
        ),
        (
            "bf16 / fp32 server throughput",
            "skipped"
            if s["bf16_over_fp32_throughput"] is None
            else f"{s['bf16_over_fp32_throughput']:.2f}",
            "report",
            "",
        ),
    ]
    lo, hi = s["throughput_ratio_range"]
    lines = [
        f"SIE encode bench: {MODEL}, {env['cpu']} x{env['cpu_count']}, torch {env['torch']}, "
        f"{'quick' if results['quick'] else 'full'} run ({p['calls']} calls, "
        f"concurrency {p['concurrency']}), {results['elapsed_s']:.0f}s",
        "",
        *(f"{a:<44}{b:>12}{c:>13}{d:>5}" for a, b, c, d in rows),
        "",
        "context (absolute numbers move with the machine)",
        f"  server fp32 texts/s {s['server_texts_per_s']:.1f}, in-process best "
        f"{s['in_process_best_texts_per_s']:.1f}; ratio over every pairing {lo:.2f} .. {hi:.2f}",
        "  in-process texts/s by batch size: "
        + "; ".join(
            f"{x['label']}: "
            + " ".join(f"{k}={v:.0f}" for k, v in x["texts_per_s"].items())
            + f" (best {x['best_batch_size']})"
            for x in results["baselines"]
        ),
        f"  latency (ms): server p50 {s['server_latency_p50_ms']:.2f} p95 "
        f"{s['server_latency_p95_ms']:.2f}; in-process batch-1 paired p50 {paired['p50_ms']:.2f} "
        f"p95 {paired['p95_ms']:.2f}; baselines "
        + ", ".join(
            f"{x['label']} {x['batch1_p50_ms']:.2f}/{x['batch1_p95_ms']:.2f}"
            for x in results["baselines"]
        ),
        "  cosine vs in-process (min of 12 texts): "
        + ", ".join(f"{k} {v:.6f}" for k, v in results["cosine_vs_in_process"].items()),
        f"  padding, medium texts only (throughput phases): {_pct(s['medium_padding'])}",
        "",
        f"{'server phase':<16}{'dtype':>9}{'texts/s':>9}{'p50':>9}{'p95':>9}{'batch':>7}"
        f"{'pad':>7}{'busy':>6}{'queue':>9}{'tok':>7}{'infer':>9}{'post':>7}{'srvCPU':>8}"
        f"{'cliCPU':>8}{'err':>5}",
    ]
    for r in results["server_phases"]:
        m = r["server_mean_ms"]
        cpu = r["server_cpu_s"] / r["wall_s"] if r["server_cpu_s"] is not None else float("nan")
        lines.append(
            f"{r['label']:<16}{r['dtype']:>9}{r['texts_per_s']:>9.1f}{r['p50_ms']:>9.2f}"
            f"{r['p95_ms']:>9.2f}{_num(r['mean_batch_size']):>7}{_pct(r['padding']):>7}"
            f"{_pct(r['model_busy'], 0):>6}{m['queue']:>9.2f}{m['tokenization']:>7.2f}{m['inference']:>9.2f}"
            f"{m['postprocessing']:>7.2f}{cpu:>8.2f}{r['client_cpu_s'] / r['wall_s']:>8.2f}"
            f"{r['errors']:>5}"
        )
    lines += [
        "  (ms columns: server-side means per call; batch: mean items per forward pass; busy:",
        "   share of the wall time the model thread ran forward passes; CPU columns: cores busy",
        "   on average, server process and this client process)",
        "  batch sizes (size: forward passes): "
        + "; ".join(
            f"{r['label']}: " + " ".join(f"{k}:{v}" for k, v in r["batch_sizes"].items())
            for r in results["server_phases"]
            if r["batch_sizes"]
        ),
        "",
        "server exit codes after SIGTERM: "
        + ", ".join(f"{k} {v}" for k, v in results["server_exit_codes"].items()),
    ]
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """NaN and infinities become null (strict JSON); keys become strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    """Strict JSON (NaN becomes null), indented; the folder is made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
