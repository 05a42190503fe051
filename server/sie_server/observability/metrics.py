"""The server's metrics: its bucket bounds and series names over the shared store.

The store (``Metrics``, ``Histogram``) lives in ``sie_sdk.metrics`` so the HTTP bridge records
its own request metrics the same way; it is re-exported here for the server's imports.

Series the server records (labels as in the API spec):

* ``sie_requests_total{model, endpoint, status}``: every unary RPC, once, where it arrives
  (``grpc_api.errors.translate_errors``); status ``ok`` or the error reason.
* ``sie_request_duration_seconds{model, endpoint, phase}``: every request the engine completed,
  one observation per phase of ``PHASES`` (``engine.registry``).
* ``sie_batch_size{model}``, ``sie_batches_total{model, status}``, ``sie_batch_tokens_total``,
  ``sie_batch_padded_tokens_total``: every batch run.
* ``sie_tokens_processed_total{model}``: the tokens of every completed request.
* ``sie_model_load_failures_total{model}``, ``sie_model_evictions_total{model}`` (memory budget).
"""

from __future__ import annotations

from sie_sdk.metrics import Histogram, Labels, Metrics

from sie_server.domain import Timing

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "PHASES",
    "REQUESTS_TOTAL",
    "REQUEST_DURATION",
    "SECONDS_BUCKETS",
    "Histogram",
    "Labels",
    "Metrics",
    "record_timing",
]

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

REQUESTS_TOTAL = "sie_requests_total"
REQUEST_DURATION = "sie_request_duration_seconds"
#: The phases of ``sie_request_duration_seconds``, as ``domain.Timing`` measures them.
PHASES = ("total", "queue", "tokenization", "inference", "postprocessing")


def record_timing(metrics: Metrics, timing: Timing, *, model: str, endpoint: str) -> None:
    """One ``sie_request_duration_seconds`` observation per phase of a completed request."""
    for phase, ms in zip(
        PHASES,
        (
            timing.total_ms,
            timing.queue_ms,
            timing.tokenization_ms,
            timing.inference_ms,
            timing.postprocessing_ms,
        ),
        strict=True,
    ):
        metrics.observe(
            REQUEST_DURATION,
            ms / 1000.0,
            SECONDS_BUCKETS,
            model=model,
            endpoint=endpoint,
            phase=phase,
        )
