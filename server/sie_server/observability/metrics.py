"""In-process metrics: counters and histograms keyed by name and labels.

Updated on the event loop only (request completion, batch completion), so no locks. The status
stream publishes ``snapshot()``; a Prometheus exposition can be rendered from the same data.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

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
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, buckets: tuple[float, ...], **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._histograms[name]
        if key not in series:
            series[key] = Histogram(buckets)
        series[key].observe(value)

    def counter(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: {"counters": {name: [{labels, value}]}, "histograms": {name: [...]}}."""
        counters = {
            name: [{"labels": dict(k), "value": v} for k, v in series.items()]
            for name, series in self._counters.items()
        }
        histograms = {
            name: [
                {
                    "labels": dict(k),
                    "buckets": list(h.buckets),
                    "counts": list(h.counts),
                    "sum": h.total,
                    "count": h.count,
                }
                for k, h in series.items()
            ]
            for name, series in self._histograms.items()
        }
        return {"counters": counters, "histograms": histograms}
