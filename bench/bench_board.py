"""The scoreboard's outputs: the issue's targets (met / missed / not measured), the markdown
table, the PNG plot and the JSON file. Pure functions of the results dictionary, which is what
``bench_scoreboard`` writes to the JSON file, so a report can be re-rendered from a JSON alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_rounds import PEER_KEY

#: The faster engine options' rows (bench_scoreboard.ENGINE_OPTIONS).
ENGINE_ROWS = ("our gRPC, ONNX engine", "our gRPC, ONNX int8 engine")
#: ``targets``' ``add``: name, value, goal, met, format of the value.
Add = Callable[[str, float | None, str, bool | None, str], None]
#: The targets ``bench_rounds`` measures side by side: its key, by the target's name here.
SIDE_BY_SIDE = {
    "gRPC 32x1 medium / in-process best": "grpc_over_inproc_32x1_medium",
    "bridge msgpack / gRPC (32x1 medium)": "bridge_over_grpc_32x1_medium",
    "gRPC 1x1 short p50 - in-process batch-1 p50": "grpc_1x1_short_over_inproc_ms",
    "bridge msgpack 1x1 short p50 - in-process batch-1 p50": "bridge_1x1_short_over_inproc_ms",
}


def _row(results: dict[str, Any], system: str, conc: int, tpc: int, kind: str) -> Any:
    return next(
        (
            r
            for r in results["rows"]
            if r["system"] == system
            and (r["concurrency"], r["texts_per_call"], r["kind"]) == (conc, tpc, kind)
        ),
        None,
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target of issue 16: name, measured, goal, met (True/False/None)."""
    out: list[dict[str, Any]] = []

    # Targets measured side by side in rounds (bench_rounds): name -> (their results, key).
    sides: dict[str, tuple[dict[str, Any], str]] = {}
    if results.get("side_by_side"):
        sides = {name: (results["side_by_side"], key) for name, key in SIDE_BY_SIDE.items()}
    for label, rounds in (results.get("peer_side_by_side") or {}).items():
        sides[peer_target(label)] = (rounds, PEER_KEY)

    def add(name: str, value: float | None, goal: str, met: bool | None, fmt: str) -> None:
        shown = "not measured" if value is None else fmt.format(value)
        side, key = sides.get(name, ({}, ""))
        if side:
            # The verdict is the rounds' median; the grid's single cell is shown beside it.
            median = side["medians"][key]
            values = [r[key] for r in side["rounds"]]
            cell = shown
            shown = (
                f"{fmt.format(median)} (side by side, median of {len(values)} round"
                + ("s" if len(values) > 1 else "")
                + ": "
                + ", ".join(fmt.format(v) for v in values)
                + f"; grid cell {cell})"
            )
            value, met = median, side["met"][key]
        out.append({"target": name, "measured": shown, "value": value, "goal": goal, "met": met})

    if "rows" in results:
        encode_targets(results, add)
    for workload, library in (("score", "CrossEncoder.predict"), ("extract", "GLiNER")):
        row = _task_row(results, workload, 32)
        value = row["ratio"] if row else None
        add(f"{workload}: gRPC 32 clients / {library} best in-process batch", value, ">= 1.00",
            None if value is None else value >= 1.0, "{:.2f}x")  # fmt: skip
    return out


def peer_target(label: str) -> str:
    """The name of the "gRPC / peer" target of a peer's row label."""
    return f"gRPC / {label.split(' (')[0]} (32x1 medium)"


def _task_row(results: dict[str, Any], workload: str, conc: int) -> Any:
    rows = (results.get("tasks") or {}).get("rows", [])
    return next((r for r in rows if r["workload"] == workload and r["concurrency"] == conc), None)


def encode_targets(results: dict[str, Any], add: Add) -> None:
    """The all-MiniLM-L6-v2 encode targets (the scoreboard's encode phases)."""
    grpc = _row(results, "our gRPC", 32, 1, "medium")
    ratio = grpc["ratio"] if grpc else None
    add("gRPC 32x1 medium / in-process best", ratio, ">= 1.00",
        None if ratio is None else ratio >= 1.0, "{:.2f}x")  # fmt: skip
    options = [_row(results, s, 32, 1, "medium") for s in ENGINE_ROWS]
    ratios = [(r["ratio"], r["system"]) for r in options if r]
    fast, which = max(ratios) if ratios else (None, "ONNX")
    add(f"same, fastest engine option ({which.removeprefix('our gRPC, ')})", fast, ">= 1.50",
        None if fast is None else fast >= 1.5, "{:.2f}x")  # fmt: skip
    quality = results.get("engine_quality", {}).get("onnx-int8")
    if quality:
        add("int8 engine: least cosine to torch, 64 medium texts", quality["cosine_min"],
            "(reported)", None, "{:.4f}")  # fmt: skip
        add("int8 engine: recall@1, 40 hand-written pairs (torch: "
            f"{quality['recall_at_1_torch']:.3f})", quality["recall_at_1"], "(reported)", None,
            "{:.3f}")  # fmt: skip
    for peer in ("infinity-emb 0.0.78 (HTTP)", "original SIE 0.10.1, 2 threads (HTTP)"):
        other = _row(results, peer, 32, 1, "medium")
        value = grpc["texts_per_s"] / other["texts_per_s"] if grpc and other else None
        value = None if other and not other["texts_per_s"] else value
        add(peer_target(peer), value, ">= 1.50",
            None if value is None else value >= 1.5, "{:.2f}x")  # fmt: skip
    bridge = _row(results, "our bridge msgpack", 32, 1, "medium")
    ok = bridge and grpc and grpc["texts_per_s"]
    value = bridge["texts_per_s"] / grpc["texts_per_s"] if ok else None
    add("bridge msgpack / gRPC (32x1 medium)", value, ">= 0.95",
        None if value is None else value >= 0.95, "{:.2f}x")  # fmt: skip
    b1 = results["inprocess_batch1_short_p50_ms"]
    for system, budget in (("our gRPC", 2.0), ("our bridge msgpack", 4.0)):
        one = _row(results, system, 1, 1, "short")
        value = one["p50_ms"] - b1 if one else None
        add(f"{system.removeprefix('our ')} 1x1 short p50 - in-process batch-1 p50", value,
            f"<= +{budget:.0f} ms", None if value is None else value <= budget,
            "{:+.2f} ms")  # fmt: skip
    mixed = _row(results, "our gRPC", 32, 1, "mixed")
    pad = mixed["padding"] if mixed else None
    add("padding, gRPC 32x1 mixed", None if pad is None else 100 * pad, "<= 10%",
        None if pad is None else pad <= 0.10, "{:.1f}%")  # fmt: skip
    share = mixed["gemm_share"] if mixed else None
    add("tokens/s / GEMM bound, 32x1 mixed (torch path)", None if share is None else 100 * share,
        ">= 75% (fastest engine)", None, "{:.0f}%")  # fmt: skip
    engines_mixed = [_row(results, s, 32, 1, "mixed") for s in ENGINE_ROWS]
    shares = [(r["gemm_share"], r["system"]) for r in engines_mixed if r]
    share, which = max(shares) if shares else (None, "ONNX")
    add(f"tokens/s / GEMM bound, 32x1 mixed, fastest engine ({which.removeprefix('our gRPC, ')})",
        None if share is None else 100 * share, ">= 75%",
        None if share is None else share >= 0.75, "{:.0f}%")  # fmt: skip
    tail = grpc["tail"] if grpc else None
    add("tail p99/p50, gRPC 32x1 medium", tail, "<= 1.30",
        None if tail is None else tail <= 1.3, "{:.2f}")  # fmt: skip
    pay = results.get("payload_bytes_over_4dim", {})
    for transport in ("grpc", "msgpack"):
        value = pay.get(transport)
        add(f"float32 vector bytes / (4 dim), {transport}", value, "<= 1.05",
            None if value is None else value <= 1.05, "{:.3f}")  # fmt: skip


def _f(value: Any, fmt: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and np.isnan(value))
        else fmt.format(value)
    )


def markdown(results: dict[str, Any]) -> str:
    m, t = results["machine"], results["torch"]
    encode = "rows" in results
    lines = [
        f"# SIE scoreboard, {results['profile']} run, {results['finished_at']}",
        "",
        (
            f"Model `{results['model']}`, fp32, CPU."
            if encode
            else "Other workloads only (`--tasks-only`), fp32, CPU."
        )
        + " Every ratio is against a baseline measured in this same run; absolute numbers hold "
        "only for this machine at this moment.",
        "",
        f"- CPU: {m['cpu']}, {m['cpu_count']} logical CPUs (affinity {m['affinity']}), "
        f"flags: {' '.join(m['flags']) or 'none of interest'}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in m['load_average_at_start'] or [])}",
        f"- torch {t['torch']} ({t['cpu_capability']}), {t['onednn']}, {t['mkl']}, oneDNN bf16: "
        f"{t['onednn_bf16']}; intra-op threads {t['intra_op_threads']}, inter-op "
        f"{t['inter_op_threads']}",
        "- " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- git {results['git']}; elapsed {results['elapsed_s']:.0f} s",
    ]
    if encode:
        g = results["gemm"]
        lines.append(
            f"- GEMM probe: {g['flops_per_s'] / 1e9:.1f} GFLOP/s fp32 over this model's layer "
            f"shapes at {g['tokens']} tokens, {g['threads']} threads ("
            + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in g["flops_per_s_by_shape"].items())
            + ")"
        )
    lines += [
        "",
        "## Targets (issue 16)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for x in results["targets"]:
        met = {True: "met", False: "**missed**", None: "-"}[x["met"]]
        lines.append(f"| {x['target']} | {x['measured']} | {x['goal']} | {met} |")
    if encode:
        lines += encode_sections(results)
    if results.get("tasks"):
        lines += tasks_section(results["tasks"])
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def encode_sections(results: dict[str, Any]) -> list[str]:
    """In process, services and batch sizes of the all-MiniLM-L6-v2 encode phases."""
    lines = [
        "",
        "## In process",
        "",
        "| system | kind | tokens/text | batch | texts/s | padding | GEMM bound texts/s | share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["inprocess"]:
        bound = results["gemm_bound_texts_per_s"][r["kind"]]
        lines.append(
            f"| {r['system']} | {r['kind']} | {results['tokens_per_text'][r['kind']]:.0f} | "
            f"{r['batch_size']} | {r['texts_per_s']:.1f} | {100 * r['padding']:.0f}% | "
            f"{bound:.0f} | {100 * r['texts_per_s'] / bound:.0f}% |"
        )
    after = results.get("inprocess_best_after")
    if after:
        lines += [
            "",
            "Best batch before and after our servers ran (each ratio divides by the mean):",
            "",
        ]
        for kind, first in results["inprocess_best"].items():
            second = after[kind]
            lines.append(
                f"- {kind}: {first['texts_per_s']:.1f} texts/s (batch {first['batch_size']}), then "
                f"{second['texts_per_s']:.1f} (batch {second['batch_size']}); mean "
                f"{results['inprocess_best_mean'][kind]:.1f}"
            )
    lines += [
        "",
        f"In-process batch-1 p50 on short texts: {results['inprocess_batch1_short_p50_ms']:.2f} ms."
        " AutoModel vs sentence-transformers, min cosine: "
        + ", ".join(f"{k} {v:.6f}" for k, v in results["automodel_cosine"].items()),
        "",
        "## Services (closed loop)",
        "",
        "conc = concurrent clients; per call = texts per request; ratio = texts/s over the "
        "in-process best batch for the same kind (the mean of before and after, where both ran); GEMM = share of the GEMM bound; server CPU in "
        "cores (bridge rows: server + bridge); batches = mean items per forward pass.",
        "",
        "| system | kind | conc | per call | texts/s | tokens/s | p50 ms | p99 ms | p99/p50 | "
        "ratio | GEMM | server CPU | padding | batches | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        cpu = r["server_cpu"]
        if cpu is not None and r["bridge_cpu"] is not None:
            cpu_s = f"{cpu:.2f} + {r['bridge_cpu']:.2f}"
        else:
            cpu_s = _f(cpu, "{:.2f}")
        lines.append(
            f"| {r['system']} | {r['kind']} | {r['concurrency']} | {r['texts_per_call']} | "
            f"{r['texts_per_s']:.1f} | {r['tokens_per_s']:.0f} | {_f(r['p50_ms'], '{:.1f}')} | "
            f"{_f(r['p99_ms'], '{:.1f}')} | {_f(r['tail'], '{:.2f}')} | "
            f"{_f(r['ratio'], '{:.2f}x')} | {_f(r['gemm_share'], '{:.0%}')} | {cpu_s} | "
            f"{_f(r['padding'], '{:.0%}')} | {_f(r['mean_batch'], '{:.1f}')} | {r['errors']} |"
        )
    sizes = [
        f"{r['system']} {r['kind']} {r['concurrency']}x{r['texts_per_call']}: "
        + " ".join(f"{k}:{v}" for k, v in r["batch_sizes"].items())
        for r in results["rows"]
        if r.get("batch_sizes")
    ]
    if sizes:
        lines += ["", "Batch sizes seen (size: forward passes):", ""]
        lines += [f"- {s}" for s in sizes]
    return lines


def tasks_section(tasks: dict[str, Any]) -> list[str]:
    """The other workloads: each against its own library's best in-process batch."""
    lines = [
        "",
        "## Other workloads",
        "",
        "Random-weight models of real sizes built by the bench (bench/bench_tasks.py); items are "
        "pairs (score) or texts; ratio = items/s over the library's best in-process batch, same "
        "run, the mean of its best before and after the server phase (the host drifts); batch = "
        "mean items per forward pass on the server (extract: windows).",
        "",
        "| workload | system | clients | items/s | ratio | p50 ms | p99 ms | p99/p50 | "
        "server CPU | batch | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in tasks["workloads"].items():
        for label, b in (("best", w["best"]), ("best, after", w.get("best_after"))):
            if b is None:  # results from before the libraries ran twice
                continue
            lines.append(
                f"| {name} | {b['system']} (in process, {label}) | - | {b['items_per_s']:.1f} | "
                f"- | - | - | - | - | {b['batch_size']} | - |"
            )
        for r in (r for r in tasks["rows"] if r["workload"] == name):
            lines.append(
                f"| {name} | {r['system']} | {r['concurrency']} | {r['items_per_s']:.1f} | "
                f"{_f(r['ratio'], '{:.2f}x')} | {_f(r['p50_ms'], '{:.1f}')} | "
                f"{_f(r['p99_ms'], '{:.1f}')} | {_f(r['tail'], '{:.2f}')} | "
                f"{_f(r['server_cpu'], '{:.2f}')} | {_f(r['mean_batch'], '{:.1f}')} | "
                f"{r['errors']} |"
            )
    lines += ["", "In process, items/s at each batch size:", ""]
    for name, w in tasks["workloads"].items():
        sizes = [r for r in tasks["library"] if r["workload"] == name]
        lines.append(
            f"- {name} ({w['library']}): "
            + ", ".join(f"batch {r['batch_size']} {r['items_per_s']:.1f}" for r in sizes)
        )
    lines += ["", "Models and requests:", ""]
    for name, w in tasks["workloads"].items():
        shape = w.get("shape", {})
        unit = w["unit"].removesuffix("s") if w["items_per_call"] == 1 else w["unit"]
        lines.append(
            f"- {name}: `{w['model']}`, {shape.get('layers')} layers, hidden {shape.get('hidden')}, "
            f"{shape.get('heads')} heads, intermediate {shape.get('intermediate')}, vocab "
            f"{w.get('vocab')}; {w['items_per_call']} {unit} per request, "
            f"{_f(w.get('tokens_per_item'), '{:.0f}')} tokens per item; first call (load) "
            f"{_f(w.get('first_call_s'), '{:.1f}')} s; {w.get('check', 'no check')}"
        )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput against concurrency (medium texts, one per request), one line per system,
    with the in-process best batch and the GEMM bound as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    systems = dict.fromkeys(r["system"] for r in results["rows"])
    for system in systems:
        points = sorted(
            (r["concurrency"], r["texts_per_s"])
            for r in results["rows"]
            if r["system"] == system and r["kind"] == "medium" and r["texts_per_call"] == 1
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
    best = results["inprocess_best"]["medium"]
    mean = results.get("inprocess_best_mean", {}).get("medium", best["texts_per_s"])
    ax.axhline(mean, color="black", linestyle="--",
               label=f"in-process best (batch {best['batch_size']}, mean of before and after)")  # fmt: skip
    ax.axhline(results["gemm_bound_texts_per_s"]["medium"], color="grey", linestyle=":",
               label="GEMM bound")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 8, 32], labels=["1", "8", "32"])
    ax.set_xlabel("concurrent clients (one medium text per request)")
    ax.set_ylabel("texts/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{results['model']} fp32, {results['machine']['cpu']}, {results['finished_at']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_all(results: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"]
    paths[0].write_text(json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n")
    paths[1].write_text(markdown(results))
    if "inprocess_best" not in results:  # --tasks-only: no encode rows to plot
        return paths[:2]
    plot(results, paths[2])
    return paths
