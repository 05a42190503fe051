"""When a failed call is retried, and after how long: written once for both clients.

Retried: the reasons whose row in ``sie_sdk.reasons.REASONS`` says ``sdk_retries``
(MODEL_LOADING, MODEL_NOT_LOADED, QUEUE_FULL, LORA_LOADING, SHUTTING_DOWN and an unreachable
backend). The wait honours the server's hint (``Retry-After`` on HTTP; ``RetryInfo`` or
``grpc-retry-pushback-ms`` on gRPC, both read into ``SIEError.retry_after``), else backs off
exponentially from ``INITIAL_DELAY_S`` to ``MAX_DELAY_S`` (whichever is longer, with up to 50%
jitter so refused callers spread out instead of returning in lock step), and never past the call's
``provision_timeout_s``; after that the last error is raised. An unreachable server
(BACKEND_UNAVAILABLE) is waited for only ``CONNECT_RETRY_S`` (a restart, a rolling update) unless
the call asked ``wait_for_capacity=True``: a wrong address fails in seconds, not minutes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from sie_sdk.client.errors import SIEError
from sie_sdk.reasons import REASONS

INITIAL_DELAY_S = 0.25
MAX_DELAY_S = 5.0
CONNECT_RETRY_S = 10.0


@dataclass(slots=True)
class RetryPolicy:
    budget_s: float
    wait_for_capacity: bool = False
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0

    def delay_after(self, error: SIEError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise ``error``."""
        row = REASONS.get(error.code or "")
        if row is None or not row.sdk_retries:
            return None
        budget = self.budget_s
        if error.code == "BACKEND_UNAVAILABLE" and not self.wait_for_capacity:
            budget = min(budget, CONNECT_RETRY_S)
        remaining = budget - (time.monotonic() - self.started)
        if remaining <= 0:
            return None
        backoff = min(MAX_DELAY_S, INITIAL_DELAY_S * 2.0**self.attempts)
        self.attempts += 1
        # Never sooner than the server's hint, backing off further on each refusal, with jitter
        # so that refused callers do not come back in lock step (a retry storm under overload).
        hint = error.retry_after if error.retry_after is not None else 0.0
        delay = max(hint, backoff) * (1.0 + 0.5 * self._random())
        return max(0.0, min(delay, remaining))

    @staticmethod
    def _random() -> float:
        value: float = random.random()
        return value
