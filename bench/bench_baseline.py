"""The baseline: sentence-transformers encoding in this process, on the CPU."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import Profile, cycle, percentile

BATCH_SIZES = (8, 16, 32, 64)


@dataclass(slots=True)
class BaselineResult:
    label: str
    texts: int
    texts_per_s: dict[int, float]
    best_batch_size: int
    best_texts_per_s: float
    batch1_calls: int
    batch1_p50_ms: float
    batch1_p95_ms: float


class InProcess:
    def __init__(self, model_path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_path), device="cpu")

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray[Any, Any]:
        out = self.model.encode(
            list(texts), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32)

    def time_one(self, text: str) -> float:
        """Milliseconds to encode one text (batch 1)."""
        started = time.perf_counter()
        self.encode([text], 1)
        return (time.perf_counter() - started) * 1000.0

    def run(
        self, label: str, medium: Sequence[str], short: Sequence[str], profile: Profile
    ) -> BaselineResult:
        texts = cycle(medium, profile.baseline_texts)
        self.encode(texts[:64], 64)  # warm-up: allocator, oneDNN kernels for these shapes
        rates: dict[int, float] = {}
        for batch_size in BATCH_SIZES:
            started = time.perf_counter()
            self.encode(texts, batch_size)
            rates[batch_size] = len(texts) / (time.perf_counter() - started)
        best = max(rates, key=lambda b: rates[b])
        latencies: list[float] = []
        for text in short[:5]:
            self.encode([text], 1)
        deadline = time.monotonic() + profile.phase_time_limit_s
        for text in cycle(short, profile.baseline_latency_calls):
            if time.monotonic() > deadline:
                break
            latencies.append(self.time_one(text))
        return BaselineResult(
            label=label,
            texts=len(texts),
            texts_per_s=rates,
            best_batch_size=best,
            best_texts_per_s=rates[best],
            batch1_calls=len(latencies),
            batch1_p50_ms=percentile(latencies, 50),
            batch1_p95_ms=percentile(latencies, 95),
        )
