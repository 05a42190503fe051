"""The batching policy in a simulated closed loop: no server, no model, no noise.

    .venv/bin/python bench/sim_batching.py [--kinds medium,mixed,short] [--skips=-1,1,0]
        [--clients 32] [--seconds 200] [--ms-per-batch 4] [--ms-per-token 0.18] [--workers 2]

``PendingQueue`` (the server's own policy code) is driven as the executor drives it: a batch is
taken when a compute worker is idle, and one more is prepared ahead while passes run once a group
can fill a batch. With ``--workers 2`` (the CPU's default, engine/compute_lane.py) two passes run
side by side: one that starts on an idle lane runs at full speed, one that starts beside another
takes ``--narrow-factor`` times as long (one thread instead of two). Each of ``--clients``
closed-loop clients sends one text (its token count drawn from the bench corpus, counted by
MiniLM's tokenizer), and sends the next ``--turnaround-ms`` after its answer. A forward pass takes ``ms-per-batch + ms-per-token x padded tokens``: padding costs
what a real token costs (the defaults are a rough fit of MiniLM's passes on this machine).

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
from dataclasses import dataclass
from typing import Any, cast

from sie_server.engine.batching import Batch, BatchLimits, PendingQueue
from sie_server.engine.work import WorkItem

WARM_S = 20.0
KEY: Hashable = "encode"


@dataclass(frozen=True)
class Model:
    ms_per_batch: float
    ms_per_token: float
    turnaround_ms: float
    #: Passes that may run at once, and how much longer one takes beside another.
    workers: int = 1
    narrow_factor: float = 1.0

    def seconds(self, batch: Batch) -> float:
        return (self.ms_per_batch + self.ms_per_token * batch.padded_tokens) / 1000.0


@dataclass(frozen=True)
class Outcome:
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    padding: float
    mean_batch: float


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
    running = 0
    prepared: Batch | None = None
    latencies: list[float] = []
    sizes: list[int] = []
    padding = padded = 0
    while events:
        now, _, client, done = heapq.heappop(events)
        if now > seconds:
            break
        if done is None:  # a client's call arrives
            item = WorkItem(client, rng.choice(lengths), KEY, cast(Any, None), cast(Any, None))
            item.admitted_at = now
            queue.push(item)
        else:  # a forward pass ended: its callers send their next calls
            running -= 1
            for finished in done.items:
                at(now + model.turnaround_ms / 1000.0, finished.payload, None)
                if now > WARM_S:
                    latencies.append(now - finished.admitted_at)
            if now > WARM_S:
                sizes.append(len(done.items))
                padding += done.padded_tokens - done.tokens
                padded += done.padded_tokens
        while running < model.workers and (prepared is not None or len(queue)):
            batch, prepared = prepared or queue.take_batch(limits), None
            assert batch is not None
            beside = model.narrow_factor if running else 1.0  # an idle lane: every core
            running += 1
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
