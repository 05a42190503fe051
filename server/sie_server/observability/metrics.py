"""In-process metrics: counters and histograms keyed by name and labels.

Updated on the event loop only (request completion, batch completion), so no locks. The status
stream publishes every series as typed samples; a Prometheus exposition can be rendered from the
same data. Counters count whole things (requests, tokens, batches), so they are integers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, int]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)

    def inc(self, name: str, value: int = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float, buckets: tuple[float, ...], **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._histograms[name]
        if key not in series:
            series[key] = Histogram(buckets)
        series[key].observe(value)

    def counter(self, name: str, **labels: str) -> int:
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def counters(self) -> Iterator[tuple[str, dict[str, str], int]]:
        """Every counter series: (name, labels, value)."""
        for name, series in self._counters.items():
            for key, value in series.items():
                yield name, dict(key), value

    def histograms(self) -> Iterator[tuple[str, dict[str, str], Histogram]]:
        """Every histogram series: (name, labels, histogram)."""
        for name, series in self._histograms.items():
            for key, histogram in series.items():
                yield name, dict(key), histogram
