"""Client-side throttling (``sie_sdk.client._throttle``): under overload the server sees about
``ratio`` attempts per call it accepts, however many callers wait; it never holds an attempt back
while the server accepts most, nor for one caller retrying, and it forgets an overload that ended.
Then both clients, over a transport that refuses everything: the throttle spares the server most
of the attempts, and every call still ends in the server's QUEUE_FULL error within its budget."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from sie_sdk import Item, SIEAsyncClient, SIEClient
from sie_sdk.client._throttle import MIN_REFUSALS, WINDOW_S, Throttle
from sie_sdk.client._transports.base import CallOptions, Operation
from sie_sdk.client.errors import ServerError, SIEError

MODEL = "org/model"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(hint: float = 0.7) -> ServerError:
    return ServerError("queue full", code="QUEUE_FULL", status_code=503, retry_after=hint)


def simulate(
    throttle: Throttle, clock: FakeClock, *, seconds: int, offered: int, capacity: int
) -> list[tuple[int, int]]:
    """``offered`` attempts a second against a server that accepts ``capacity`` a second and
    refuses the rest: (attempts the server saw, attempts it accepted) for each second."""
    seen: list[tuple[int, int]] = []
    for _ in range(seconds):
        sent = accepted = 0
        for i in range(offered):
            clock.now = int(clock.now) + i / offered
            if throttle.before(MODEL) is not None:
                continue
            sent += 1
            if accepted < capacity:
                accepted += 1
                throttle.after(MODEL, None)
            else:
                throttle.after(MODEL, refused())
        seen.append((sent, accepted))
        clock.now = int(clock.now) + 1
    return seen


def test_under_overload_the_server_sees_about_ratio_attempts_per_accepted_call() -> None:
    clock = FakeClock()
    throttle = Throttle(2.0, clock=clock, draw=random.Random(3).random)
    seen = simulate(throttle, clock, seconds=30, offered=100, capacity=10)
    steady = seen[-WINDOW_S:]
    sent = sum(s for s, _ in steady) / len(steady)
    accepted = sum(a for _, a in steady) / len(steady)
    assert accepted == 10, "the throttle never leaves the server idle"
    assert 15 <= sent <= 30, f"the server saw {sent:.1f} attempts a second, not about 20"
    assert seen[0][0] >= 10 + MIN_REFUSALS, "nothing is held back before the refusals count"
    # Unthrottled, the same load costs the server every attempt.
    clock_off = FakeClock()
    off = simulate(Throttle(0, clock=clock_off), clock_off, seconds=3, offered=100, capacity=10)
    assert [s for s, _ in off] == [100, 100, 100]


def test_no_attempt_is_held_while_the_server_accepts_most_or_refuses_few() -> None:
    clock = FakeClock()
    throttle = Throttle(2.0, clock=clock, draw=lambda: 0.0)  # any positive chance holds
    seen = simulate(throttle, clock, seconds=5, offered=100, capacity=60)
    assert [s for s, _ in seen] == [100] * 5
    lone = Throttle(2.0, clock=clock, draw=lambda: 0.0)
    for _ in range(MIN_REFUSALS - 1):  # one caller retrying a full queue
        assert lone.before(MODEL) is None
        lone.after(MODEL, refused())
    assert lone.hold_probability(MODEL) == 0.0
    assert lone.before("") is None, "calls of no model (list_models) are never held"


def test_a_held_attempt_is_the_servers_refusal_with_its_last_hint_and_ends_with_the_window() -> (
    None
):
    clock = FakeClock()
    throttle = Throttle(2.0, clock=clock, draw=lambda: 0.0)
    for _ in range(MIN_REFUSALS):
        assert throttle.before(MODEL) is None
        throttle.after(MODEL, refused(hint=2.5))
    throttle.after(MODEL, SIEError("down", code="BACKEND_UNAVAILABLE"))  # counts as neither
    assert throttle.hold_probability(MODEL) == pytest.approx(MIN_REFUSALS / (MIN_REFUSALS + 1))
    held = throttle.before(MODEL)
    assert isinstance(held, ServerError)
    assert (held.code, held.status_code, held.model, held.retry_after) == (
        "QUEUE_FULL",
        503,
        MODEL,
        2.5,
    )
    assert "client-side throttling" in str(held)
    clock.now += WINDOW_S + 1
    assert throttle.hold_probability(MODEL) == 0.0
    assert throttle.before(MODEL) is None


def test_ratio_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="throttle_ratio"):
        SIEClient("http://127.0.0.1:1", throttle_ratio=0.5)


class RefusingTransport:
    """Every call refused with QUEUE_FULL; counts what reached it."""

    def __init__(self) -> None:
        self.sent = 0

    def _refuse(self) -> Any:
        self.sent += 1
        raise ServerError(
            "queue full", code="QUEUE_FULL", status_code=503, model=MODEL, retry_after=0.01
        )

    def send(self, op: Operation, body: Any, call: CallOptions) -> Any:
        return self._refuse()

    def close(self) -> None:
        pass


class AsyncRefusingTransport(RefusingTransport):
    async def send(self, op: Operation, body: Any, call: CallOptions) -> Any:
        await asyncio.sleep(0)
        return self._refuse()

    async def close(self) -> None:  # type: ignore[override]
        pass


CALLS = 60
BUDGET_S = 0.6


async def refused_calls_async(ratio: float) -> tuple[int, list[BaseException]]:
    client = SIEAsyncClient("http://127.0.0.1:1", throttle_ratio=ratio)
    transport = AsyncRefusingTransport()
    client._transport = transport  # type: ignore[assignment]
    calls = [
        client.encode(MODEL, {"text": f"t{i}"}, provision_timeout_s=BUDGET_S) for i in range(CALLS)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return transport.sent, [o for o in outcomes if isinstance(o, BaseException)]


async def test_the_async_client_spares_a_refusing_server_most_attempts() -> None:
    sent_off, errors_off = await refused_calls_async(0)
    sent_on, errors_on = await refused_calls_async(2.0)
    for errors in (errors_off, errors_on):
        assert len(errors) == CALLS
        assert all(isinstance(e, ServerError) and e.code == "QUEUE_FULL" for e in errors)
    assert sent_off >= 2 * CALLS, "unthrottled, every call retries within its budget"
    assert sent_on < sent_off / 2, (sent_on, sent_off)


def test_the_sync_client_shares_one_throttle_across_its_threads() -> None:
    client = SIEClient(
        "http://127.0.0.1:1", throttle_ratio=2.0, max_items_per_request=1, max_concurrency=16
    )
    transport = RefusingTransport()
    client._transport = transport  # type: ignore[assignment]
    items = [Item(text=f"t{i}") for i in range(CALLS)]
    with pytest.raises(ServerError) as caught:
        # One item per request: 60 requests, 16 threads at a time, all refused.
        client.encode(MODEL, items, provision_timeout_s=0.3)
    assert caught.value.code == "QUEUE_FULL"
    assert client._throttle.hold_probability(MODEL) > 0.5
    assert transport.sent < 2 * CALLS
