"""Prometheus text exposition (format 0.0.4) of a status snapshot.

One renderer for every ``/metrics``: the server's metrics port renders the snapshot its status
stream sends; the HTTP bridge renders the server's snapshot plus its own ``sie_bridge_*`` series.

What is rendered:

* every ``CounterSample`` as a ``counter`` (integer value);
* every ``HistogramSample`` as a ``histogram``: cumulative ``_bucket{le=...}`` lines in bound
  order ending with ``le="+Inf"`` (equal to ``_count``), then ``_sum`` and ``_count``;
* gauges derived from the snapshot's ``models``: ``sie_queue_depth{model}`` (items admitted and
  not yet resolved), ``sie_model_loaded{model,device}`` (1/0) and
  ``sie_model_memory_bytes{model,device}``.

Invariants: each metric name is one family with exactly one ``# TYPE`` line (``# HELP`` where a
text is known), families sorted by name, series sorted by labels, so equal inputs render equal
text; within a line labels are sorted by name, ``le`` last. Label values escape ``\\``, ``"`` and newlines. A name used with two types, or a histogram
whose per-bucket counts do not match its bounds and count, is a bug and raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sie_sdk.v1 import status_pb2

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: HELP texts of the spec's metrics, the server's extra series and the bridge's own.
HELP: Mapping[str, str] = {
    "sie_requests_total": "Total request count (status: ok or the error reason)",
    "sie_request_duration_seconds": (
        "Latency by phase (total, queue, tokenization, inference, postprocessing)"
    ),
    "sie_batch_size": "Batch size distribution (items per batch)",
    "sie_tokens_processed_total": "Total tokens processed",
    "sie_queue_depth": "Pending items per model",
    "sie_model_loaded": "Model load status (1/0)",
    "sie_model_memory_bytes": "Memory per model, bytes",
    "sie_batches_total": "Batches run, by outcome",
    "sie_batch_tokens_total": "Real tokens in the batches run",
    "sie_batch_padded_tokens_total": "Padded tokens (longest x items) in the batches run",
    "sie_model_load_failures_total": "Failed model loads",
    "sie_model_evictions_total": "Models unloaded to stay within the memory budget",
    "sie_bridge_requests_total": "HTTP requests the bridge answered, by route template",
    "sie_bridge_request_duration_seconds": "HTTP request latency at the bridge, by route template",
}


@dataclass(slots=True)
class _Family:
    kind: str
    series: list[tuple[tuple[tuple[str, str], ...], list[str]]] = field(default_factory=list)


def render(
    snapshot: status_pb2.WatchStatusResponse | None = None,
    *,
    counters: Iterable[status_pb2.CounterSample] = (),
    histograms: Iterable[status_pb2.HistogramSample] = (),
    help_texts: Mapping[str, str] | None = None,
) -> str:
    """The exposition text of ``snapshot`` (its samples and model gauges) plus extra samples."""
    families: dict[str, _Family] = {}
    all_counters = [*(snapshot.counters if snapshot else ()), *counters]
    all_histograms = [*(snapshot.histograms if snapshot else ()), *histograms]
    for counter in all_counters:
        labels = dict(counter.labels)
        _add(
            families, counter.name, "counter", labels, [_line(counter.name, labels, counter.value)]
        )
    for histogram in all_histograms:
        _add(families, histogram.name, "histogram", dict(histogram.labels), _histogram(histogram))
    for model in snapshot.models if snapshot else ():
        on_device = {"model": model.name, "device": model.device}
        loaded = 1 if model.state == "loaded" else 0
        gauges = (
            ("sie_queue_depth", {"model": model.name}, model.queue_pending_items),
            ("sie_model_loaded", on_device, loaded),
            ("sie_model_memory_bytes", on_device, model.memory_bytes),
        )
        for name, labels, value in gauges:
            _add(families, name, "gauge", labels, [_line(name, labels, value)])
    texts = {**HELP, **(help_texts or {})}
    lines: list[str] = []
    for name in sorted(families):
        family = families[name]
        if name in texts:
            lines.append(f"# HELP {name} {_escape_help(texts[name])}")
        lines.append(f"# TYPE {name} {family.kind}")
        for _, series_lines in sorted(family.series, key=lambda s: s[0]):
            lines.extend(series_lines)
    return "\n".join(lines) + "\n" if lines else ""


def _add(
    families: dict[str, _Family],
    name: str,
    kind: str,
    labels: Mapping[str, str],
    lines: list[str],
) -> None:
    family = families.setdefault(name, _Family(kind))
    if family.kind != kind:
        raise ValueError(f"metric {name} is both a {family.kind} and a {kind}")
    family.series.append((tuple(sorted(labels.items())), lines))


def _histogram(sample: status_pb2.HistogramSample) -> list[str]:
    name, labels = sample.name, dict(sample.labels)
    bounds, counts = list(sample.bounds), list(sample.counts)
    if len(counts) != len(bounds) + 1 or sum(counts) != sample.count:
        raise ValueError(
            f"histogram {name}{labels}: {len(counts)} counts summing to {sum(counts)} "
            f"for {len(bounds)} bounds and count {sample.count}"
        )
    lines = []
    cumulative = 0
    for bound, count in zip(bounds, counts, strict=False):
        cumulative += count
        lines.append(_line(f"{name}_bucket", {**labels, "le": _float(bound)}, cumulative))
    lines.append(_line(f"{name}_bucket", {**labels, "le": "+Inf"}, sample.count))
    lines.append(_line(f"{name}_sum", labels, sample.sum))
    lines.append(_line(f"{name}_count", labels, sample.count))
    return lines


def _line(name: str, labels: Mapping[str, str], value: float) -> str:
    text = _float(value) if isinstance(value, float) else str(int(value))
    if not labels:
        return f"{name} {text}"
    ordered = sorted(labels.items(), key=lambda kv: (kv[0] == "le", kv[0]))
    pairs = ",".join(f'{key}="{_escape_label(v)}"' for key, v in ordered)
    return f"{name}{{{pairs}}} {text}"


def _float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
