"""The SDK's retry policy: never sooner than the server's hint, backing off on each refusal with
bounded jitter (so refused callers spread out instead of returning in lock step), within the
call's budget; not-retryable reasons are raised at once."""

from __future__ import annotations

from sie_sdk.client._retry import INITIAL_DELAY_S, MAX_DELAY_S, RetryPolicy
from sie_sdk.client.errors import ServerError


def refusal(hint: float | None) -> ServerError:
    return ServerError("queue full", code="QUEUE_FULL", status_code=503, retry_after=hint)


def test_delays_honour_the_hint_back_off_and_jitter_within_bounds() -> None:
    policy = RetryPolicy(budget_s=1000.0)
    delays = [policy.delay_after(refusal(0.5)) for _ in range(8)]
    for attempt, delay in enumerate(delays):
        assert delay is not None
        floor = max(0.5, min(MAX_DELAY_S, INITIAL_DELAY_S * 2.0**attempt))
        assert floor <= delay <= 1.5 * floor
    assert delays[-1] >= MAX_DELAY_S  # backed off to the cap
    spread = {
        round(RetryPolicy(budget_s=10.0).delay_after(refusal(1.0)) or 0, 6) for _ in range(20)
    }
    assert len(spread) > 1, "callers refused together do not come back together"


def test_the_budget_bounds_the_wait_and_other_reasons_are_not_retried() -> None:
    policy = RetryPolicy(budget_s=0.2)
    delay = policy.delay_after(refusal(5.0))
    assert delay is not None
    assert delay <= 0.2
    not_retryable = ServerError("boom", code="INFERENCE_ERROR", status_code=500)
    assert RetryPolicy(budget_s=100.0).delay_after(not_retryable) is None
