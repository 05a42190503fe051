"""Tracing on: the OpenTelemetry implementation of ``observability.tracing.Tracing``.

Imported only by ``tracing.server_tracing`` when ``--tracing`` is on (it imports OpenTelemetry).

* Every RPC but health and reflection gets a server span from opentelemetry-instrumentation-grpc's
  asyncio interceptor, a child of the caller's span when the call carries W3C ``traceparent``
  metadata; ``TraceIdTrailer`` then returns the trace id in the ``x-trace-id`` trailing metadata
  (on errors too), so a gRPC caller can look its trace up.
* Every completed batch becomes one ``sie.batch`` span. A batch mixes requests of several traces,
  so the span is a child of its first request's span (a single-request trace shows its batch in
  line) and links to the span of every request in it. Its times are the forward pass's: it ends
  when the batch completes on the event loop and starts ``inference_ms`` before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_name
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from sie_sdk.tracing import otlp_tracer_provider, trace_id_hex

from sie_server.config import Settings
from sie_server.observability.tracing import BatchFacts, Tracing

log = logging.getLogger(__name__)
#: The trailing metadata key carrying the call's 32-hex-digit trace id.
TRACE_ID_TRAILER = "x-trace-id"
#: Probed every few seconds by load balancers and orchestrators: no span per probe.
UNTRACED_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
BATCH_SPAN = "sie.batch"
DEFAULT_SERVICE_NAME = "sie-server"

Context = grpc.aio.ServicerContext[Any, Any]
#: grpc's stubs type method handlers for the blocking server; the aio ones hold coroutines.
Handler = Any
Metadata = Sequence[tuple[str, str | bytes]]


class OtelTracing(Tracing):
    def __init__(
        self, provider: trace.TracerProvider, *, owned: SdkTracerProvider | None = None
    ) -> None:
        """``owned``: the provider built here (``provider`` itself), which ``shutdown`` flushes
        and closes; a provider handed over is left to its owner."""
        self._provider = provider
        self._owned = owned
        self._tracer = provider.get_tracer("sie_server")

    @classmethod
    def from_settings(cls, settings: Settings) -> OtelTracing:
        """The provider handed over in ``settings.tracer_provider``, else one exporting OTLP to
        ``--otlp-endpoint`` as ``--service-name``."""
        if settings.tracer_provider is not None:
            return cls(settings.tracer_provider)
        provider = otlp_tracer_provider(
            settings.service_name, DEFAULT_SERVICE_NAME, settings.otlp_endpoint
        )
        return cls(provider, owned=provider)

    def capture(self) -> object | None:
        context = trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    def batch_done(self, model: str, batch: BatchFacts, requests: Sequence[object | None]) -> None:
        try:
            self._batch_span(model, batch, requests)
        except Exception:  # tracing never fails serving
            log.exception("%s: recording the span of batch %d failed", model, batch.batch_id)

    def _batch_span(self, model: str, batch: BatchFacts, requests: Sequence[object | None]) -> None:
        # One link per request (a request's items may fill the batch), in arrival order.
        linked: dict[tuple[int, int], tuple[SpanContext, int]] = {}
        for context in requests:
            if isinstance(context, SpanContext):
                key = (context.trace_id, context.span_id)
                seen = linked.get(key)
                linked[key] = (context, 1 if seen is None else seen[1] + 1)
        end_ns = time.time_ns()
        parent = next(iter(linked.values()), None)
        span = self._tracer.start_span(
            BATCH_SPAN,
            # Not the loop's current context: a batch belongs to its requests' traces only.
            context=(
                trace.set_span_in_context(NonRecordingSpan(parent[0]))
                if parent is not None
                else otel_context.Context()
            ),
            kind=SpanKind.INTERNAL,
            attributes={
                "sie.model": model,
                "sie.batch.id": batch.batch_id,
                "sie.batch.items": batch.items,
                "sie.batch.tokens": batch.tokens,
                "sie.batch.padded_tokens": batch.padded_tokens,
                "sie.batch.inference_ms": batch.inference_ms,
                "sie.batch.requests": len(linked),
            },
            links=[Link(context, {"sie.batch.items": n}) for context, n in linked.values()],
            start_time=end_ns - round(batch.inference_ms * 1e6),
        )
        if not batch.ok:
            span.set_status(Status(StatusCode.ERROR, "the batch failed"))
        span.end(end_time=end_ns)

    def server_interceptors(self) -> list[Any]:
        untraced = negate(any_of(*(service_name(name) for name in UNTRACED_SERVICES)))
        spans = aio_server_interceptor(tracer_provider=self._provider, filter_=untraced)  # type: ignore[no-untyped-call]
        return [spans, TraceIdTrailer()]

    def shutdown(self) -> None:
        if self._owned is not None:
            self._owned.shutdown()


class _TrailerContext:
    """A servicer context whose trailing metadata always carries ``trailer`` as well."""

    def __init__(self, context: Context, trailer: Metadata) -> None:
        self._context = context
        self._trailer = tuple(trailer)
        context.set_trailing_metadata(self._trailer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._context.set_trailing_metadata((*trailing_metadata, *self._trailer))

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        await self._context.abort(code, details, (*trailing_metadata, *self._trailer))


def _trailer() -> Metadata | None:
    trace_id = trace_id_hex()
    return None if trace_id is None else ((TRACE_ID_TRAILER, trace_id),)


class TraceIdTrailer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Returns the current trace id in ``x-trace-id`` trailing metadata of unary and
    server-streaming calls; runs inside the OpenTelemetry interceptor, so its span is current."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_behavior(request: Any, context: Context) -> Any:
                trailer = _trailer()
                wrapped = context if trailer is None else _TrailerContext(context, trailer)
                return await unary(request, wrapped)

            return grpc.unary_unary_rpc_method_handler(
                unary_behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
                trailer = _trailer()
                wrapped = context if trailer is None else _TrailerContext(context, trailer)
                async for message in stream(request, wrapped):
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
