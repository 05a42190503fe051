"""The server's tracing hooks: a no-op by default, OpenTelemetry with ``--tracing``.

The engine calls one hook per event and never asks whether tracing is on:

* ``capture()`` when a request's work is submitted (on the request's task, inside its gRPC server
  span): the request's span context, kept on each of its work items (None with tracing off).
* ``batch_done(model, batch, requests)`` when a batch completes (on the event loop): with tracing
  on, one ``sie.batch`` span covering the forward pass, linked to the span of every request with
  items in the batch (``requests``: what ``capture`` returned for each item).
* ``server_interceptors()`` when the gRPC server is assembled: the interceptors that give every
  RPC its server span, continuing the caller's trace (W3C ``traceparent`` metadata).
* ``shutdown()`` when the server stops: flush and close the exporter it built.

``server_tracing(settings)`` picks the implementation once; only with tracing on does it import
``sie_server.observability.otel`` and with it OpenTelemetry (``pip install 'sie[tracing]'``).
Spans, attributes and flags are listed in docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from sie_server.config import Settings


class BatchFacts(Protocol):
    """What the batch span records (``engine.executor.BatchStats`` has it)."""

    @property
    def batch_id(self) -> int: ...
    @property
    def items(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def padded_tokens(self) -> int: ...
    @property
    def inference_ms(self) -> float: ...
    @property
    def ok(self) -> bool: ...


class Tracing:
    """Tracing off: every hook does nothing."""

    def capture(self) -> object | None:
        """The current request's span context, to link its batches to (None: not traced)."""
        return None

    def batch_done(self, model: str, batch: BatchFacts, requests: Sequence[object | None]) -> None:
        """A batch of ``model`` completed; ``requests`` holds each item's ``capture()``."""

    def server_interceptors(self) -> list[Any]:
        """gRPC server interceptors to run first (outermost)."""
        return []

    def shutdown(self) -> None:
        """Flush what is still buffered and release the exporter."""


NO_TRACING: Final = Tracing()


def server_tracing(settings: Settings) -> Tracing:
    """The tracing the settings ask for: ``NO_TRACING`` unless ``settings.tracing``."""
    if not settings.tracing:
        return NO_TRACING
    try:
        from sie_server.observability.otel import OtelTracing
    except ImportError as exc:
        raise SystemExit(
            f"--tracing needs OpenTelemetry (pip install 'sie[tracing]'): {exc}"
        ) from None
    return OtelTracing.from_settings(settings)
