"""Admission control of one model: what it has admitted, what it is preparing, and when to say
"come back later". Event-loop only (no locks), owned by the model's ``BatchExecutor``.

* A request is admitted whole or refused whole with ``QueueFull``. An empty model admits any
  request (so one large request still runs); otherwise a request that would push admitted
  tokens or items past their bounds is refused.
* At most ``max_preparing`` requests are tokenized at once, so a burst is refused before it
  costs any work.
* The retry hint of ``QueueFull`` is when the admitted work will have drained: admitted tokens
  over the model's recent tokens per second (an average over finished batches), at least the
  configured floor and at most 30 s. A constant hint makes refused callers return in lock step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from sie_server.errors import QueueFull

MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_tokens: int
    max_items: int
    max_preparing: int
    retry_floor_s: float


class Admission:
    def __init__(self, model: str, limits: AdmissionLimits) -> None:
        self.model = model
        self.limits = limits
        self.items = 0
        self.tokens = 0
        self.preparing_requests = 0
        self.tokens_per_s = 0.0

    def full(self) -> bool:
        return self.tokens >= self.limits.max_tokens or self.items >= self.limits.max_items

    def check(self) -> None:
        """Fail fast before any work is spent on a request."""
        if self.full():
            raise self.queue_full()

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Hold a preparation slot while a request is tokenized."""
        self.check()
        if self.preparing_requests >= self.limits.max_preparing:
            raise QueueFull(
                f"model {self.model!r} is preparing {self.preparing_requests} requests already",
                model=self.model,
                retry_after_s=self.limits.retry_floor_s,
            )
        self.preparing_requests += 1
        try:
            yield
        finally:
            self.preparing_requests -= 1

    def admit(self, tokens: int, items: int) -> None:
        if self.items and (
            self.tokens + tokens > self.limits.max_tokens
            or self.items + items > self.limits.max_items
        ):
            raise self.queue_full()
        self.items += items
        self.tokens += tokens

    def release(self, tokens: int) -> None:
        self.items -= 1
        self.tokens -= tokens

    def observe_batch(self, tokens: int, seconds: float) -> None:
        """A finished forward pass: update the model's recent rate."""
        if seconds <= 0:
            return
        rate = tokens / seconds
        previous = self.tokens_per_s
        self.tokens_per_s = rate if previous <= 0 else 0.8 * previous + 0.2 * rate

    def retry_after_s(self) -> float:
        if self.tokens_per_s <= 0:
            return self.limits.retry_floor_s
        drain = self.tokens / self.tokens_per_s
        return min(MAX_RETRY_AFTER_S, max(self.limits.retry_floor_s, drain))

    def queue_full(self) -> QueueFull:
        return QueueFull(
            f"model {self.model!r} queue is full "
            f"({self.items} items, {self.tokens} tokens pending)",
            model=self.model,
            retry_after_s=self.retry_after_s(),
        )
