"""The fuzz and property tests' profile, read once from the environment.

``make test`` runs them with their bounded budgets and fixed seeds, so a failure replays.
``make fuzz`` scales every budget (``SIE_FUZZ_SCALE``, 10 there) and, given ``FUZZ_SEED=N``,
explores cases the fixed seeds never reach (``SIE_FUZZ_SEED``; hypothesis then draws from
``--hypothesis-seed``, which the Makefile sets to the same number), so a failure found that way
replays with the same ``FUZZ_SEED``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def _scale() -> float:
    raw = os.environ.get("SIE_FUZZ_SCALE", "1")
    value = float(raw)
    if not value > 0:
        raise ValueError(f"SIE_FUZZ_SCALE must be a positive number, not {raw!r}")
    return value


SCALE = _scale()
#: None: each fuzzer's own fixed seed.
SEED: int | None = int(os.environ["SIE_FUZZ_SEED"]) if os.environ.get("SIE_FUZZ_SEED") else None


def budget(cases: int) -> int:
    """``cases`` (the bounded budget of ``make test``) scaled by the profile."""
    return max(1, round(cases * SCALE))


def seed(fixed: int) -> int:
    """The seed of a fuzzer whose fixed seed is ``fixed``: itself, unless the profile sets one
    (then mixed with ``fixed``, so two fuzzers do not draw the same sequence)."""
    return fixed if SEED is None else hash((SEED, fixed)) & 0xFFFF_FFFF


def hypothesis_settings(examples: int) -> settings:
    """Settings of a property test: ``budget(examples)`` examples, no example database, no
    deadline and no health checks (generation may be slow on a busy machine, which is not what
    these tests are about); derandomized (a fixed seed) unless the profile sets one."""
    return settings(
        max_examples=budget(examples),
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
