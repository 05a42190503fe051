"""Admission's retry hint under sustained overload (a fake clock; no model, no event loop)."""

from __future__ import annotations

import pytest
from sie_server.engine.admission import (
    DEMAND_WINDOW_S,
    MAX_RETRY_AFTER_S,
    Admission,
    AdmissionLimits,
)
from sie_server.errors import QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _full_admission(clock: Clock) -> Admission:
    """A model at its item bound, draining 100 tokens/s with 100 tokens admitted: 1 s of work."""
    admission = Admission("m", AdmissionLimits(10_000, 4, 64, 0.05), clock)
    for _ in range(4):
        admission.admit(25, 1)
    admission.observe_batch(100, 1.0)
    return admission


def _refuse(admission: Admission) -> float:
    with pytest.raises(QueueFull) as refused:
        admission.admit(25, 1)
    hint = refused.value.retry_after_s
    assert hint is not None
    return hint


def test_the_hint_is_the_drain_time_while_refusals_are_few() -> None:
    clock = Clock()
    admission = _full_admission(clock)
    assert _refuse(admission) == pytest.approx(1.0)


def test_the_hint_grows_with_refusals_per_admission_and_falls_back_when_they_stop() -> None:
    clock = Clock()
    admission = _full_admission(clock)
    # In one window: 4 admitted, then 40 refused: each admission turned ten callers away.
    hints = [_refuse(admission) for _ in range(40)]
    assert hints[0] == pytest.approx(1.0)
    assert hints[-1] == pytest.approx(10.0)  # 40 refusals / 4 admissions, times the 1 s drain
    assert hints == sorted(hints)
    # Many more refusals never push the hint past its cap.
    assert max(_refuse(admission) for _ in range(400)) == MAX_RETRY_AFTER_S
    # Two quiet windows later the count has aged out: the hint is the drain time again.
    clock.now += 2 * DEMAND_WINDOW_S
    assert admission.retry_after_s() == pytest.approx(1.0)


def test_admissions_in_the_window_bring_the_hint_down() -> None:
    clock = Clock()
    admission = _full_admission(clock)
    for _ in range(20):
        _refuse(admission)
    high = admission.retry_after_s()
    for _ in range(16):  # room frees up and 16 more requests are admitted in the same window
        admission.release(25)
        admission.admit(25, 1)
    assert admission.retry_after_s() < high
    assert admission.retry_after_s() == pytest.approx(1.0)  # 20 refused for 20 admitted
