"""The batching policy in a simulated closed loop: no server, no model, no noise.

    .venv/bin/python bench/sim_batching.py [--kinds medium,mixed,short] [--skips=-1,1,0]
        [--clients 32] [--seconds 200] [--ms-per-batch 4] [--ms-per-token 0.18] [--workers 2]
        [--gather-ms 0] [--even-batches]

``PendingQueue`` (the server's own policy code) is driven as the executor drives it: a batch is
taken when a compute worker is idle, and one more is prepared ahead while passes run once a group
can fill a batch. With ``--workers 2`` (the CPU's default, engine/compute_lane.py) two passes run
side by side: one that starts on an idle lane runs at full speed, one that starts beside another
takes ``--narrow-factor`` times as long (one thread instead of two). Each of ``--clients``
closed-loop clients sends one text (its token count drawn from the bench corpus, counted by
MiniLM's tokenizer), and sends the next ``--turnaround-ms`` after its answer. A forward pass takes ``ms-per-batch + ms-per-token x padded tokens``: padding costs
what a real token costs (the defaults are a rough fit of MiniLM's passes on this machine).

Two executor variants, not in the server, can be tried (docs/performance.md, "Where the
two-worker tail comes from"): ``--gather-ms`` makes a batch that would start beside a running one
wait that long for more arrivals first (a queue delay, as Triton's); ``--even-batches`` holds such
a batch to half of the items queued and running, so that the two passes are of even size.

What it is for: what a change of policy does to padding, batch size and the tail, read in
seconds and free of the host's noise. It predicts no absolute figure: a real run
(``bench_padding.py --flag ...``) confirms what matters. Lines as a markdown table.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from sie_server.engine.batching import Batch, BatchLimits, PendingQueue
from sie_server.engine.work import WorkItem

WARM_S = 20.0
KEY: Hashable = "encode"
#: The event of a queue delay's end (``--gather-ms``), in the client slot of the event queue.
GATHERED = -2


@dataclass(frozen=True)
class Model:
    ms_per_batch: float
    ms_per_token: float
    turnaround_ms: float
    #: Passes that may run at once, and how much longer one takes beside another.
    workers: int = 1
    narrow_factor: float = 1.0
    #: Variants of the executor (module docstring): a queue delay before a batch that would run
    #: beside another, and batches beside another held to half of the work in hand.
    gather_ms: float = 0.0
    even_batches: bool = False

    def seconds(self, batch: Batch) -> float:
        return (self.ms_per_batch + self.ms_per_token * batch.padded_tokens) / 1000.0


@dataclass(frozen=True)
class Outcome:
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    padding: float
    mean_batch: float


def _limits(
    limits: BatchLimits, model: Model, queue: PendingQueue, running: Sequence[Batch]
) -> BatchLimits:
    """``limits``, or with ``even_batches`` beside a running pass, at most half of the items
    queued and running."""
    if not (model.even_batches and running):
        return limits
    in_hand = len(queue) + sum(len(batch.items) for batch in running)
    half = max(1, -(-in_hand // model.workers))
    return replace(limits, max_batch_items=min(limits.max_batch_items, half))


def simulate(
    lengths: Sequence[int],
    limits: BatchLimits,
    model: Model,
    *,
    clients: int,
    seconds: float,
    seed: int = 0,
) -> Outcome:
    rng = random.Random(seed)
    queue = PendingQueue()
    events: list[tuple[float, int, int, Batch | None]] = []  # (time, order, client, batch done)
    order = 0

    def at(when: float, client: int, done: Batch | None) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, client, done))

    for client in range(clients):
        at(rng.random() * 0.01, client, None)
    running: list[Batch] = []
    prepared: Batch | None = None
    gather_until: float | None = None  # a pending queue delay's end
    latencies: list[float] = []
    sizes: list[int] = []
    padding = padded = 0
    while events:
        now, _, client, done = heapq.heappop(events)
        if now > seconds:
            break
        if client == GATHERED:  # a queue delay ended
            gather_until = None
        elif done is None:  # a client's call arrives
            item = WorkItem(client, rng.choice(lengths), KEY, cast(Any, None), cast(Any, None))
            item.admitted_at = now
            queue.push(item)
        else:  # a forward pass ended: its callers send their next calls
            running = [batch for batch in running if batch is not done]
            for finished in done.items:
                at(now + model.turnaround_ms / 1000.0, finished.payload, None)
                if now > WARM_S:
                    latencies.append(now - finished.admitted_at)
            if now > WARM_S:
                sizes.append(len(done.items))
                padding += done.padded_tokens - done.tokens
                padded += done.padded_tokens
        beside_one = 0 < len(running) < model.workers and prepared is None and len(queue)
        if model.gather_ms and beside_one and client != GATHERED:
            if gather_until is None:
                gather_until = now + model.gather_ms / 1000.0
                at(gather_until, GATHERED, None)
            continue
        while len(running) < model.workers and (prepared is not None or len(queue)):
            limited = _limits(limits, model, queue, running)
            batch, prepared = prepared or queue.take_batch(limited), None
            assert batch is not None
            beside = model.narrow_factor if running else 1.0  # an idle lane: every core
            running.append(batch)
            at(now + model.seconds(batch) * beside, -1, batch)
        if running and prepared is None and queue.has_full_batch(limits):
            prepared = queue.take_batch(limits, full_only=True)
    latencies.sort()
    return Outcome(
        texts_per_s=len(latencies) / (seconds - WARM_S),
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        padding=padding / max(padded, 1),
        mean_batch=statistics.mean(sizes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="medium,mixed,short", help="kinds of text")
    parser.add_argument("--skips", default="-1,1,0", help="max-batch-skips values (-1: off)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=200.0, help="simulated seconds")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-batch-items", type=int, default=64)
    parser.add_argument("--max-batch-padding", type=float, default=0.10)
    parser.add_argument("--ms-per-batch", type=float, default=4.0)
    parser.add_argument("--ms-per-token", type=float, default=0.18)
    parser.add_argument("--turnaround-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2, help="passes side by side (the CPU's)")
    parser.add_argument(
        "--narrow-factor",
        type=float,
        default=1.65,
        help="how much longer a pass takes beside another (measured: two workers gave 1.13-1.42x "
        "the texts/s of one)",
    )
    parser.add_argument(
        "--gather-ms", type=float, default=0.0,
        help="a variant: a batch that would start beside a running one waits this long first",
    )  # fmt: skip
    parser.add_argument(
        "--even-batches", action="store_true",
        help="a variant: a batch beside a running one holds at most half the work in hand",
    )  # fmt: skip
    args = parser.parse_args()
    from bench_padding import corpus, token_counts  # the tokenizer, only when run

    texts = corpus()
    tokens = token_counts(texts)
    by_kind = {kind: [tokens[t] for t in group] for kind, group in texts.items()}
    by_kind["mixed"] = [n for group in by_kind.values() for n in group]
    model = Model(
        args.ms_per_batch,
        args.ms_per_token,
        args.turnaround_ms,
        workers=args.workers,
        narrow_factor=args.narrow_factor,
        gather_ms=args.gather_ms,
        even_batches=args.even_batches,
    )
    print("| kind | max-batch-skips | texts/s | p50 ms | p99 ms | p99/p50 | padding | batch |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for value in (int(v) for v in args.skips.split(",")):
            limits = BatchLimits(
                args.max_batch_tokens,
                args.max_batch_items,
                args.max_batch_padding,
                None if value < 0 else value,
            )
            out = simulate(by_kind[kind], limits, model, clients=args.clients, seconds=args.seconds)
            print(
                f"| {kind} | {value} | {out.texts_per_s:.1f} | {out.p50_ms:.0f} | "
                f"{out.p99_ms:.0f} | {out.p99_ms / out.p50_ms:.2f} | {out.padding:.1%} | "
                f"{out.mean_batch:.1f} |"
            )


if __name__ == "__main__":
    main()
