"""Windows over a long text and their stitching, for the GLiNER family (pure functions: word
counts in, word spans out). The rules are described in ``sie_server.adapters.gliner``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sie_server.tasks.extract import Entity


def plan_windows(
    counts: Sequence[int], max_words: int, budget: int, overlap: int
) -> list[tuple[int, int]]:
    """Word windows ``[start, end)`` covering ``len(counts)`` words (``counts[i]``: word i's
    tokens): at most ``max_words`` words and ``budget`` tokens each (a lone word may exceed
    it), consecutive windows sharing ``min(overlap, size // 2)`` words."""
    total = len(counts)
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end, used = start, 0
        while (
            end < total
            and end - start < max_words
            and (end == start or used + counts[end] <= budget)
        ):
            used += counts[end]
            end += 1
        windows.append((start, end))
        if end >= total:
            return windows
        start = max(start + 1, end - min(overlap, (end - start) // 2))


def home_window(bounds: Sequence[tuple[int, int]], total: int, first: int, last: int) -> int:
    """Index of the window holding words ``[first, last]`` with the most context (the largest
    distance to a cut edge; the text's own ends are not cuts); the earliest on ties."""
    best, best_margin = -1, -1.0
    for index, (start, end) in enumerate(bounds):
        if start <= first and last < end:
            left = first - start if start > 0 else math.inf
            right = end - 1 - last if end < total else math.inf
            margin = min(left, right)
            if margin > best_margin:
                best, best_margin = index, margin
    return best


def merge_adjacent(entities: Sequence[Entity], text: str) -> list[Entity]:
    """Merge same-label entities that touch or are one character apart (in start order)."""
    merged: list[Entity] = []
    for entity in sorted(entities, key=lambda e: (e.start or 0, e.end or 0)):
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.label == entity.label
            and (entity.start or 0) <= (last.end or 0) + 1
        ):
            start, end = last.start or 0, max(last.end or 0, entity.end or 0)
            merged[-1] = Entity(
                text=text[start:end],
                label=last.label,
                score=max(last.score, entity.score),
                start=start,
                end=end,
            )
        else:
            merged.append(entity)
    return merged
