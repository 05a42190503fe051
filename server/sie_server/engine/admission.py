"""Admission control of one model: what it has admitted, what it is preparing, and when to say
"come back later". Event-loop only (no locks), owned by the model's ``BatchExecutor``.

* A request is admitted whole or refused whole with ``QueueFull``. An empty model admits any
  request (so one large request still runs); otherwise a request that would push admitted
  tokens or items past their bounds is refused.
* At most ``max_preparing`` requests are tokenized at once, and the items of those being
  tokenized are reserved: a request that would not fit beside the admitted items and the
  reserved ones is refused before it is tokenized, not after (which would spend the tokenizer
  on work that is then refused). A burst is refused before it costs any work.
* The retry hint of ``QueueFull`` is when the admitted work will have drained: admitted tokens
  over the model's recent tokens per second (an average over finished batches), at least the
  configured floor and at most 30 s. A constant hint makes refused callers return in lock step.
* Under sustained overload the callers waiting to retry outnumber what one drain admits: they
  return every hint and most are refused again, and the refusals cost the cores the model needs.
  So the hint grows by the ratio of refusals to admissions over the last seconds: when ``k``
  requests are refused for each one admitted, the hint is ``k`` drains, which spreads the
  waiting callers over the time it takes to serve them (about one refusal per admission).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sie_server.errors import QueueFull

MAX_RETRY_AFTER_S = 30.0
#: Window over which refusals and admissions are counted (the newest full window and the
#: current one).
DEMAND_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_tokens: int
    max_items: int
    max_preparing: int
    retry_floor_s: float


class Admission:
    def __init__(
        self,
        model: str,
        limits: AdmissionLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.limits = limits
        self.items = 0
        self.tokens = 0
        self.preparing_requests = 0
        #: Items of the requests being prepared (reserved until they are admitted or refused).
        self.reserved_items = 0
        self.tokens_per_s = 0.0
        self._clock = clock
        self._demand = _Demand(clock())

    def full(self) -> bool:
        return self.tokens >= self.limits.max_tokens or self.items >= self.limits.max_items

    def check(self, items: int = 0) -> None:
        """Fail fast before any work is spent on a request of ``items`` items: the queue is
        full, or the request would not fit beside what is admitted and reserved (an empty model
        takes any request, as ``admit``)."""
        pending = self.items + self.reserved_items
        if self.full() or (pending and pending + items > self.limits.max_items):
            raise self.queue_full()

    @contextlib.contextmanager
    def preparing(self, items: int = 0) -> Iterator[None]:
        """Hold a preparation slot, and reserve ``items``, while a request is tokenized."""
        self.check(items)
        if self.preparing_requests >= self.limits.max_preparing:
            raise self.queue_full(
                f"model {self.model!r} is preparing {self.preparing_requests} requests already"
            )
        self.preparing_requests += 1
        self.reserved_items += items
        try:
            yield
        finally:
            self.preparing_requests -= 1
            self.reserved_items -= items

    def admit(self, tokens: int, items: int) -> None:
        if self.items and (
            self.tokens + tokens > self.limits.max_tokens
            or self.items + items > self.limits.max_items
        ):
            raise self.queue_full()
        self.items += items
        self.tokens += tokens
        self._demand.count(self._clock(), refused=False)

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
        """Drain time (admitted tokens over the recent rate) times the refusals per admission
        of the last seconds (at least 1), within [floor, 30 s]."""
        if self.tokens_per_s <= 0:
            return self.limits.retry_floor_s
        drain = self.tokens / self.tokens_per_s
        pressure = max(1.0, self._demand.refusals_per_admission(self._clock()))
        return min(MAX_RETRY_AFTER_S, max(self.limits.retry_floor_s, drain * pressure))

    def queue_full(self, message: str | None = None) -> QueueFull:
        """A refusal, counted, with the demand-scaled hint (whatever refused it: the callers
        refused for any reason are the same crowd waiting for the same drain)."""
        self._demand.count(self._clock(), refused=True)
        return QueueFull(
            message
            or f"model {self.model!r} queue is full ({self.items} items, {self.tokens} tokens "
            f"pending, {self.reserved_items} items being prepared)",
            model=self.model,
            retry_after_s=self.retry_after_s(),
        )


class _Demand:
    """Requests refused and admitted in the current window and the one before."""

    def __init__(self, now: float) -> None:
        self.started = now
        self.refused = self.admitted = 0
        self.last_refused = self.last_admitted = 0

    def _roll(self, now: float) -> None:
        if now - self.started < DEMAND_WINDOW_S:
            return
        stale = now - self.started >= 2 * DEMAND_WINDOW_S  # nothing counted for a window
        self.last_refused = 0 if stale else self.refused
        self.last_admitted = 0 if stale else self.admitted
        self.refused = self.admitted = 0
        self.started = now

    def count(self, now: float, *, refused: bool) -> None:
        self._roll(now)
        if refused:
            self.refused += 1
        else:
            self.admitted += 1

    def refusals_per_admission(self, now: float) -> float:
        self._roll(now)
        refused = self.refused + self.last_refused
        admitted = self.admitted + self.last_admitted
        return refused / max(1, admitted)
