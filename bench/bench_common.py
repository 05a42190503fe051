"""What every part of the encode bench shares: paths, the model, run profiles, statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HOST = "127.0.0.1"
# Bound on one encode call; every loop stops on a count, and also on a clock.
CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Profile:
    """Counts for one run; ``--quick`` shrinks them."""

    calls: int
    concurrency: int
    latency_calls: int
    baseline_texts: int
    baseline_latency_calls: int
    phase_time_limit_s: float


FULL = Profile(512, 32, 200, 512, 200, 300.0)
QUICK = Profile(96, 32, 40, 96, 40, 60.0)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def cycle(texts: Sequence[str], n: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(n)]
