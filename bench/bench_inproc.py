"""In-process baselines: what a user gets calling the libraries themselves, in this process.

- sentence-transformers ``encode`` at batch sizes 1/8/16/32/64, per kind of text. Each call
  gets a list of ``max(2 * batch, 16)`` texts (``encode`` sorts its input by length before it
  batches, as a user's call would), repeated until ``seconds`` have passed (at least once).
  The best batch per kind is every service row's denominator.
- plain transformers ``AutoModel`` with mean pooling over the attention mask and L2
  normalisation, per kind, at the best sentence-transformers batch size, on the texts in corpus
  order (no sorting: what hand-written code does). Its vectors are checked against
  sentence-transformers (min cosine).
- padding per row: 1 - real tokens / computed tokens (batch size x longest text of the batch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZES = (1, 8, 16, 32, 64)
MAX_TOKENS = 256


@dataclass(slots=True)
class InprocRow:
    system: str
    kind: str
    batch_size: int
    texts: int
    seconds: float
    texts_per_s: float
    padding: float


def _padding(lengths: Sequence[int], batch_size: int) -> float:
    real = computed = 0
    for first in range(0, len(lengths), batch_size):
        chunk = lengths[first : first + batch_size]
        real += sum(chunk)
        computed += max(chunk) * len(chunk)
    return 1.0 - real / computed if computed else 0.0


def _timed(
    fn: Callable[[], object], warm: Callable[[], object], n_texts: int, seconds: float
) -> tuple[int, float]:
    warm()  # one batch: this shape's kernels and allocations
    done, started = 0, time.perf_counter()
    while True:
        fn()
        done += n_texts
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done, elapsed


class Libraries:
    """The model loaded twice: as a SentenceTransformer and as a plain AutoModel."""

    def __init__(self, path: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.st = SentenceTransformer(str(path), device="cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.auto = AutoModel.from_pretrained(str(path)).eval()

    def tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them (special tokens in, truncated at 256)."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)
        return [len(ids) for ids in encoded["input_ids"]]

    def st_encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray[Any, Any]:
        out = self.st.encode(
            list(texts), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32)

    def auto_encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray[Any, Any]:
        torch = self.torch
        parts = []
        with torch.inference_mode():
            for first in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[first : first + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self.auto(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                parts.append(torch.nn.functional.normalize(pooled, dim=-1))
        out: np.ndarray[Any, Any] = torch.cat(parts).numpy()
        return out

    def batch1_p50_ms(self, texts: Sequence[str], seconds: float) -> float:
        """Median milliseconds of one ``encode([text], batch_size=1)`` call."""
        times: list[float] = []
        for text in texts[:3]:
            self.st_encode([text], 1)
        deadline = time.perf_counter() + seconds
        for i in range(10_000):
            started = time.perf_counter()
            self.st_encode([texts[i % len(texts)]], 1)
            times.append((time.perf_counter() - started) * 1000.0)
            if started > deadline and len(times) >= 20:
                break
        return float(np.median(times))

    def run(
        self,
        corpus: Mapping[str, Sequence[str]],
        tokens: Mapping[str, int],
        seconds: float,
    ) -> tuple[list[InprocRow], dict[str, float]]:
        """Every row, and the min cosine of AutoModel's vectors to sentence-transformers'."""
        rows: list[InprocRow] = []
        cosines: dict[str, float] = {}
        for kind, texts in corpus.items():
            best: InprocRow | None = None
            for batch_size in BATCH_SIZES:
                chunk = [texts[i % len(texts)] for i in range(max(2 * batch_size, 16))]
                lengths = sorted((tokens[t] for t in chunk), reverse=True)
                done, elapsed = _timed(
                    functools.partial(self.st_encode, chunk, batch_size),
                    functools.partial(self.st_encode, chunk[:batch_size], batch_size),
                    len(chunk),
                    seconds,
                )
                row = InprocRow(
                    "sentence-transformers", kind, batch_size, done, elapsed, done / elapsed,
                    _padding(lengths, batch_size),
                )  # fmt: skip
                rows.append(row)
                if best is None or row.texts_per_s > best.texts_per_s:
                    best = row
            assert best is not None
            b = best.batch_size
            chunk = [texts[i % len(texts)] for i in range(max(2 * b, 16))]
            done, elapsed = _timed(
                functools.partial(self.auto_encode, chunk, b),
                functools.partial(self.auto_encode, chunk[:b], b),
                len(chunk),
                seconds,
            )
            lengths = [tokens[t] for t in chunk]
            rows.append(
                InprocRow("transformers AutoModel", kind, b, done, elapsed, done / elapsed,
                          _padding(lengths, b))
            )  # fmt: skip
            sample = list(texts[:16])
            a, s = self.auto_encode(sample, 16), self.st_encode(sample, 16)
            cosines[kind] = float(np.min(np.sum(a * s, axis=1)))
        return rows, cosines
