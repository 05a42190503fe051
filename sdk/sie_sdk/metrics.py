"""In-process metrics: counters and histograms keyed by name and labels.

Shared by the server (engine and request metrics) and the HTTP bridge (its own request metrics).

Invariants:

* Updated on one event loop only (request completion, batch completion), so no locks.
* Counters count whole things (requests, tokens, batches), so they are integers.
* A histogram's ``counts`` has one entry per bound plus one for the observations above the last
  bound; they are per bucket, not cumulative (the Prometheus renderer accumulates). An
  observation equal to a bound falls in that bound's bucket (Prometheus ``le``).
* A series is identified by its name and its labels as a sorted tuple, so the order in which
  labels are passed does not matter.
* ``counter_samples`` / ``histogram_samples`` publish every series as the typed samples of
  ``sie.v1.WatchStatusResponse``; ``sie_sdk.prometheus`` renders those.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from sie_sdk.v1 import status_pb2

Labels = tuple[tuple[str, str], ...]


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
    """Every counter and histogram series of one process."""

    _counters: dict[str, dict[Labels, int]]
    _histograms: dict[str, dict[Labels, Histogram]]

    def __init__(self) -> None:
        self._counters = defaultdict(dict)
        self._histograms = defaultdict(dict)

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

    def histogram(self, name: str, **labels: str) -> Histogram | None:
        return self._histograms.get(name, {}).get(tuple(sorted(labels.items())))

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

    def counter_samples(self) -> list[status_pb2.CounterSample]:
        """Every counter series as a status sample."""
        return [
            status_pb2.CounterSample(name=name, labels=labels, value=value)
            for name, labels, value in self.counters()
        ]

    def histogram_samples(self) -> list[status_pb2.HistogramSample]:
        """Every histogram series as a status sample (per-bucket counts, not cumulative)."""
        return [
            status_pb2.HistogramSample(
                name=name,
                labels=labels,
                bounds=list(h.buckets),
                counts=h.counts,
                sum=h.total,
                count=h.count,
            )
            for name, labels, h in self.histograms()
        ]
