"""The service grid: which cells each system runs, how long, and one row per cell.

A cell is (concurrency, texts per request, kind of text). Its measuring window is
``max(window_s, 2.5 x round)``, where a round is the time the in-process best batch would take
for everything in flight (concurrency x texts per request); a cell whose window would exceed
``max_window_s`` is skipped and listed. The warm-up before the window is one round (at least
``warm_s``), so every client has had a reply before counting starts.

Per cell: texts/s and tokens/s (tokens counted with the model's tokenizer, the same for every
system), p50/p99 and their ratio, server CPU in cores (the server process tree's CPU seconds over
the cell's wall time; for bridge rows the bridge's own share is ``bridge_cpu``), and for our
server the padding and batch sizes from its counters (difference across the cell).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench_closed import Call, closed_loop
from bench_server import Counters

KINDS = ("short", "medium", "long", "mixed")
Cell = tuple[int, int, str]  # concurrency, texts per request, kind


@dataclass(frozen=True, slots=True)
class BoardProfile:
    name: str
    window_s: float
    max_window_s: float
    warm_s: float
    inproc_s: float
    gemm_s: float
    cells: Mapping[str, tuple[Cell, ...]]  # by system class: grpc, msgpack, json, peer, peer1


def _all(kinds: Sequence[str], conc: Sequence[int], tpc: Sequence[int]) -> tuple[Cell, ...]:
    return tuple((c, t, k) for k in kinds for t in tpc for c in conc)


FULL = BoardProfile(
    "full", 6.0, 20.0, 1.0, 2.0, 3.0,
    {
        "grpc": _all(KINDS, (1, 8, 32), (1, 32)),
        "onnx": ((1, 1, "short"), (8, 1, "medium"), (32, 1, "medium"), (32, 1, "mixed")),
        "msgpack": _all(KINDS, (1, 8, 32), (1,)) + _all(("medium",), (1, 8, 32), (32,)),
        "json": (*_all(("medium",), (1, 8, 32), (1, 32)), (1, 1, "short")),
        "peer": (*_all(("medium",), (1, 8, 32), (1, 32)), (1, 1, "short"), (32, 1, "mixed")),
        "peer1": _all(("medium",), (1, 8, 32), (1,)),
    },
)  # fmt: skip
QUICK = BoardProfile(
    "quick", 2.0, 8.0, 0.5, 0.6, 1.0,
    {
        "grpc": ((1, 1, "short"), (1, 1, "medium"), (8, 1, "medium"), (32, 1, "medium"),
                 (1, 32, "medium"), (32, 1, "mixed")),
        "onnx": ((32, 1, "medium"), (32, 1, "mixed")),
        "msgpack": ((1, 1, "short"), (32, 1, "medium")),
        "json": ((32, 1, "medium"),),
        "peer": ((1, 1, "short"), (32, 1, "medium")),
        "peer1": ((32, 1, "medium"),),
    },
)  # fmt: skip


@dataclass(slots=True)
class ServiceRow:
    system: str
    concurrency: int
    texts_per_call: int
    kind: str
    window_s: float
    calls: int
    texts_per_s: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    tail: float
    server_cpu: float | None
    client_cpu: float
    errors: int
    first_errors: list[str] = field(default_factory=list)
    bridge_cpu: float | None = None
    padding: float | None = None
    mean_batch: float | None = None
    batch_sizes: dict[str, int] | None = None
    ratio: float | None = None  # texts/s over the in-process best batch, same kind
    gemm_share: float | None = None  # texts/s over the GEMM bound, same kind


def requests_for(
    corpus: Mapping[str, Sequence[str]], kind: str, per_call: int, seed: int = 1234
) -> list[list[str]]:
    """512 texts of ``kind`` (``mixed``: seeded draws from the three), in requests of
    ``per_call``."""
    if kind == "mixed":
        rng = random.Random(seed)
        kinds = ("short", "medium", "long")
        texts = [rng.choice(corpus[rng.choice(kinds)]) for _ in range(512)]
    else:
        texts = list(corpus[kind])
    return [texts[i : i + per_call] for i in range(0, len(texts) - per_call + 1, per_call)]


@dataclass(slots=True)
class Target:
    """What a cell runs against: the call, and the processes whose CPU and counters it reads."""

    system: str
    call: Call
    cpu: Callable[[], float | None]
    bridge_cpu: Callable[[], float | None] | None = None
    counters: Callable[[], Awaitable[Counters]] | None = None


def plan(cell: Cell, best: Mapping[str, float], profile: BoardProfile) -> tuple[float, float]:
    """(warm-up, window) seconds for a cell; window 0 means skip."""
    conc, per_call, kind = cell
    round_s = conc * per_call / best[kind]
    window = max(profile.window_s, 2.5 * round_s)
    if window > profile.max_window_s:
        return 0.0, 0.0
    return max(profile.warm_s, round_s), window


async def run_cell(
    target: Target,
    cell: Cell,
    corpus: Mapping[str, Sequence[str]],
    tokens: Mapping[str, int],
    warm_s: float,
    window_s: float,
    max_window_s: float,
) -> ServiceRow:
    conc, per_call, kind = cell
    requests = requests_for(corpus, kind, per_call)
    request_tokens = [sum(tokens[t] for t in r) for r in requests]
    before = await target.counters() if target.counters else None
    cpu0, bridge0 = target.cpu(), target.bridge_cpu() if target.bridge_cpu else None
    client0, wall0 = time.process_time(), time.perf_counter()
    w = await closed_loop(
        target.call, requests, request_tokens, conc, warm_s, window_s, max_window_s, 2 * conc
    )
    window_s = w.window_s
    wall = time.perf_counter() - wall0
    cpu1, bridge1 = target.cpu(), target.bridge_cpu() if target.bridge_cpu else None
    row = ServiceRow(
        system=target.system,
        concurrency=conc,
        texts_per_call=per_call,
        kind=kind,
        window_s=window_s,
        calls=w.completed,
        texts_per_s=w.texts / window_s if window_s > 0 else 0.0,
        tokens_per_s=w.tokens / window_s if window_s > 0 else 0.0,
        p50_ms=w.p50_ms,
        p99_ms=w.p99_ms,
        tail=w.p99_ms / w.p50_ms if w.latencies_ms else float("nan"),
        server_cpu=(cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else None,
        client_cpu=(time.process_time() - client0) / wall,
        errors=w.errors,
        first_errors=w.first_errors,
    )
    if bridge0 is not None and bridge1 is not None:
        row.bridge_cpu = (bridge1 - bridge0) / wall
    if target.counters and before is not None:
        delta = await target.counters() - before
        if delta.padded_tokens:
            row.padding = 1.0 - delta.tokens / delta.padded_tokens
        if delta.batches:
            row.mean_batch = delta.batched_items / delta.batches
        row.batch_sizes = delta.batch_sizes()
    return row
