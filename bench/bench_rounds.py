"""Issue 16's ratio targets against one running server and bridge, side by side in rounds.

On these hosts two windows minutes apart differ by up to 15-20%, as much as the targets'
margins, so a ratio of two cells measured in different phases of a run says little. Here every
figure a ratio needs is measured in the same round, back to back, in an order that alternates
between rounds (reversed in odd rounds), and the result is the median over the rounds:

* latency: one short text a call, one call at a time: sentence-transformers
  ``encode([text], batch_size=1)`` in this process, and one client over gRPC and through the
  bridge (msgpack), taking turns in blocks of ``LATENCY_BLOCK`` calls on the same texts (the
  order rotating from block to block) for ``latency_s`` each in all. The host's speed drifts by
  a third within a minute (the in-process p50 moved from 18.7 to 26.9 ms between two rounds of
  one run), more than the +2 ms target; calls taking turns every few hundred milliseconds see
  the same host, windows one after the other do not;
* throughput: sentence-transformers' best of ``batches`` on 256 medium texts in this process,
  then 32 closed-loop clients x one medium text a call over gRPC and through the bridge, each
  for ``throughput_s``.

Used by ``bench_bridge.py`` (standalone) and by ``make bench`` (``bench_scoreboard.py``), whose
targets table reports these medians beside the grid's single cells.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench_closed import Call
from bench_grid import Cell, Target, run_cell
from bench_inproc import Libraries

WARM_S = 3.0
#: Calls of one system in a row before the next one's turn, in the latency measurement.
LATENCY_BLOCK = 8
THROUGHPUT: Cell = (32, 1, "medium")
#: Each ratio this module measures and its goal (``_ms``: at most, else at least).
GOALS = {
    "grpc_over_inproc_32x1_medium": 1.0,
    "grpc_1x1_short_over_inproc_ms": 2.0,
    "bridge_1x1_short_over_inproc_ms": 4.0,
    "bridge_over_grpc_32x1_medium": 0.95,
}

#: Builds a target inside the running event loop: (the target, its close).
Make = Callable[[], tuple[Target, Callable[[], Awaitable[None]]]]


@dataclass(frozen=True, slots=True)
class Windows:
    """Seconds each measurement of a round runs."""

    latency_s: float = 8.0
    throughput_s: float = 12.0
    inproc_s: float = 8.0
    batches: tuple[int, ...] = (16, 32)


async def measure(make: Make, corpus: Mapping[str, Sequence[str]], tokens: Mapping[str, int],
                  cell: Cell, seconds: float) -> tuple[float, float]:  # fmt: skip
    """(p50 ms, texts/s) of ``cell`` against the target ``make()`` builds in this loop."""
    target, close = make()
    try:
        row = await run_cell(target, cell, corpus, tokens, WARM_S, seconds, seconds)
    finally:
        await close()
    if row.errors:
        raise RuntimeError(f"{target.system}: {row.errors} errors: {row.first_errors}")
    return row.p50_ms, row.texts_per_s


async def interleaved_p50s(
    libs: Libraries, targets: Mapping[str, Make], texts: Sequence[str], seconds: float
) -> dict[str, float]:
    """``{"<name>_p50_ms"}`` for "inproc" and each of ``targets``: one text a call, one call at
    a time, the systems taking turns in blocks of ``LATENCY_BLOCK`` calls on the same texts,
    for about ``seconds`` per system (at least one block each)."""

    async def inproc(batch: Sequence[str]) -> None:
        libs.st_encode(batch, 1)  # nothing else runs in this loop while it blocks

    built = {name: make() for name, make in targets.items()}
    calls: dict[str, Call] = {"inproc": inproc}
    calls.update({name: target.call for name, (target, _) in built.items()})
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name in names:  # warm: connections, this length's kernels
            for text in texts[:3]:
                await _checked(name, calls[name], text)
        deadline = time.perf_counter() + seconds * len(names)
        block = 0
        while block < len(names) or time.perf_counter() < deadline:
            shift = block % len(names)
            batch = [texts[(block * LATENCY_BLOCK + k) % len(texts)] for k in range(LATENCY_BLOCK)]
            for name in names[shift:] + names[:shift]:
                for text in batch:
                    started = time.perf_counter()
                    await _checked(name, calls[name], text)
                    times[name].append((time.perf_counter() - started) * 1000.0)
            block += 1
    finally:
        for _, close in built.values():
            await close()
    return {f"{name}_p50_ms": statistics.median(times[name]) for name in names}


async def _checked(name: str, call: Call, text: str) -> None:
    """One call; its failure as the ``RuntimeError`` the callers report (``measure``'s too)."""
    try:
        await call([text])
    except Exception as exc:
        raise RuntimeError(f"{name}: one-text call failed: {exc!r}") from exc


def inprocess_best(
    libs: Libraries, texts: Sequence[str], batches: Sequence[int], seconds: float
) -> float:
    """Texts/s of the best of ``batches``, each encoding ``texts`` for ``seconds``."""
    best = 0.0
    for batch in batches:
        libs.st_encode(texts[:batch], batch)  # warm this shape
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            libs.st_encode(texts, batch)
            done += len(texts)
        best = max(best, done / (time.perf_counter() - started))
    return best


def one_round(
    flip: bool,
    libs: Libraries,
    targets: Mapping[str, Make],
    corpus: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    windows: Windows,
) -> dict[str, float]:
    """One round; ``targets`` holds "grpc" and "msgpack"."""
    out: dict[str, float] = {}

    def in_order(names: list[str]) -> list[str]:
        return list(reversed(names)) if flip else names

    out.update(asyncio.run(interleaved_p50s(libs, targets, corpus["short"], windows.latency_s)))
    for name in in_order(["inproc", "grpc", "msgpack"]):
        if name == "inproc":
            out["inproc_best_texts_per_s"] = inprocess_best(
                libs, list(corpus["medium"])[:256], windows.batches, windows.inproc_s
            )
        else:
            _, out[f"{name}_32x1_texts_per_s"] = asyncio.run(
                measure(targets[name], corpus, tokens, THROUGHPUT, windows.throughput_s)
            )
    out["grpc_over_inproc_32x1_medium"] = (
        out["grpc_32x1_texts_per_s"] / out["inproc_best_texts_per_s"]
    )
    out["grpc_1x1_short_over_inproc_ms"] = out["grpc_p50_ms"] - out["inproc_p50_ms"]
    out["bridge_1x1_short_over_inproc_ms"] = out["msgpack_p50_ms"] - out["inproc_p50_ms"]
    out["bridge_over_grpc_32x1_medium"] = (
        out["msgpack_32x1_texts_per_s"] / out["grpc_32x1_texts_per_s"]
    )
    return out


def in_rounds(
    count: int, one_round: Callable[[bool], dict[str, float]], goals: Mapping[str, float]
) -> dict[str, Any]:
    """``count`` rounds of ``one_round(flip)``, flip in every other one: {"rounds", "medians",
    "goals", "met"}, met by the medians (a key ending in ``_ms``: at most its goal, else at
    least)."""
    rounds: list[dict[str, float]] = []
    for number in range(count):
        result = one_round(number % 2 == 1)
        rounds.append(result)
        print(f"  round {number + 1}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in result.items()), flush=True)  # fmt: skip
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    met = {key: (medians[key] <= goal if key.endswith("_ms") else medians[key] >= goal)
           for key, goal in goals.items()}  # fmt: skip
    return {"rounds": rounds, "medians": medians, "goals": dict(goals), "met": met}


#: The key of ``peer_round``'s ratio, and its goal.
PEER_KEY = "grpc_over_peer_32x1_medium"
PEER_GOALS = {PEER_KEY: 1.5}


def peer_round(
    flip: bool,
    ours: Make,
    peer: Make,
    corpus: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    windows: Windows,
) -> dict[str, float]:
    """Our gRPC and a peer at 32 clients x one medium text, back to back (peer first: flip)."""
    out: dict[str, float] = {}
    sides = [("ours", ours), ("peer", peer)]
    for name, make in reversed(sides) if flip else sides:
        _, out[f"{name}_texts_per_s"] = asyncio.run(
            measure(make, corpus, tokens, THROUGHPUT, windows.throughput_s)
        )
    out[PEER_KEY] = out["ours_texts_per_s"] / out["peer_texts_per_s"]
    return out
