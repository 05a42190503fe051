"""Client-side throttling of a model the server keeps refusing: adaptive throttling, as in the
"Handling Overload" chapter of Google's SRE book.

Under overload most calls are refused with QUEUE_FULL, and a refusal is not free: the server
reads the request, checks admission and answers on the cores the model needs (docs/reliability.md,
"Overload": on one CPU core, throttled clients took goodput under 4x overload from 0.82-0.83 of
the peak to 0.87-1.05, median 0.94 over seven runs).
Each client therefore counts, per model and over the last ``WINDOW_S`` seconds, the attempts it
made (``requests``) and those the server accepted (``accepts``: any answer but QUEUE_FULL), and
holds back a new attempt with probability ``(requests - ratio * accepts) / (requests + 1)``. A
held attempt is a refusal made locally: the call waits as ``RetryPolicy`` says (the server's
last hint for the model, backing off, within ``provision_timeout_s``) and tries again. So the
server sees about ``ratio`` attempts per call it admits, however many callers wait.

The throttle never holds an attempt while the server accepts more than it refuses
(``requests <= 2 * accepts`` at the default ratio), nor before the window holds
``MIN_REFUSALS`` refusals: one caller retrying a full queue is never held back. It is shared by
the threads of ``SIEClient`` and the tasks of ``SIEAsyncClient`` (one lock); ``throttle_ratio=0``
turns it off.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sie_sdk.client.errors import SIEError, error_from_detail
from sie_sdk.reasons import REASONS, ErrorDetail

#: Attempts the server sees per call it accepts, under overload (the SRE book's K).
DEFAULT_RATIO = 2.0
#: The attempts counted: the last this many seconds, in one-second buckets.
WINDOW_S = 10
#: Refusals in the window before any attempt is held back.
MIN_REFUSALS = 20
REFUSED = "QUEUE_FULL"


@dataclass(slots=True)
class _Bucket:
    second: int
    requests: int = 0
    accepts: int = 0
    refusals: int = 0


class _Window:
    """One model's attempts over the last ``WINDOW_S`` seconds, and its last retry hint."""

    def __init__(self) -> None:
        self.buckets: deque[_Bucket] = deque()
        self.hint: float | None = None

    def now(self, second: int) -> _Bucket:
        while self.buckets and self.buckets[0].second <= second - WINDOW_S:
            self.buckets.popleft()
        if not self.buckets or self.buckets[-1].second != second:
            self.buckets.append(_Bucket(second))
        return self.buckets[-1]

    def totals(self) -> tuple[int, int, int]:
        requests = sum(b.requests for b in self.buckets)
        accepts = sum(b.accepts for b in self.buckets)
        refusals = sum(b.refusals for b in self.buckets)
        return requests, accepts, refusals


class Throttle:
    """Per-model adaptive throttling for one client (see the module's docstring)."""

    def __init__(
        self,
        ratio: float = DEFAULT_RATIO,
        *,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.ratio = ratio
        self._clock = clock
        self._draw = draw
        self._lock = threading.Lock()
        self._models: dict[str, _Window] = {}

    def hold_probability(self, model: str) -> float:
        """The chance that the next attempt on ``model`` is held back."""
        with self._lock:
            window = self._models.get(model)
            if window is None:
                return 0.0
            window.now(self._second())
            return self._probability(window)

    def before(self, model: str) -> SIEError | None:
        """Count an attempt on ``model`` ('': a call of no model, never held): None to send it,
        else the local refusal to raise."""
        if not model or self.ratio <= 0:
            return None
        with self._lock:
            window = self._models.setdefault(model, _Window())
            bucket = window.now(self._second())
            bucket.requests += 1
            chance = self._probability(window)
            if chance <= 0 or self._draw() >= chance:
                return None
            requests, accepts, refusals = window.totals()
            hint = window.hint
        return error_from_detail(
            ErrorDetail(
                REFUSED,
                f"model {model!r} is refusing calls (QUEUE_FULL for {refusals} of the last "
                f"{requests} attempts, {accepts} accepted); this client held the attempt back "
                f"to spare the server (client-side throttling)",
                model=model,
                retry_after_s=hint if hint is not None else REASONS[REFUSED].retry_after_s,
            )
        )

    def after(self, model: str, error: SIEError | None) -> None:
        """The server's answer to an attempt ``before`` let through: accepted (a result or any
        error but QUEUE_FULL; an unreachable server counts as neither) or refused."""
        if not model or self.ratio <= 0:
            return
        if error is not None and error.code == "BACKEND_UNAVAILABLE":
            return
        with self._lock:
            window = self._models.setdefault(model, _Window())
            bucket = window.now(self._second())
            if error is not None and error.code == REFUSED:
                bucket.refusals += 1
                window.hint = error.retry_after
            else:
                bucket.accepts += 1

    def _probability(self, window: _Window) -> float:
        requests, accepts, refusals = window.totals()
        if refusals < MIN_REFUSALS:
            return 0.0
        return max(0.0, (requests - self.ratio * accepts) / (requests + 1))

    def _second(self) -> int:
        return int(self._clock())
