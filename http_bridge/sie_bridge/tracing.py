"""Tracing on (``--tracing``): one trace from the HTTP request through the gRPC call.

Imported only when tracing is on (it imports OpenTelemetry: ``pip install 'sie[tracing]'``).

* Every HTTP request gets a server span from opentelemetry-instrumentation-aiohttp-server's
  middleware, a child of the caller's span when the request carries W3C ``traceparent``.
* Every backend call (but the status stream's) gets a client span from
  opentelemetry-instrumentation-grpc's asyncio client interceptors on the bridge's one channel,
  which also send ``traceparent`` to the server.
* Every response carries ``X-Trace-ID``: the request's 32-hex-digit trace id (error responses,
  aiohttp's own 404/405 and the WebSocket handshake too).

Spans, attributes and flags are listed in docs/observability.md.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.instrumentation import aiohttp_server
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.instrumentation.grpc.filters import negate, service_name
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from sie_sdk.tracing import otlp_tracer_provider, trace_id_hex
from sie_sdk.v1 import status_pb2

from sie_bridge.config import BridgeSettings
from sie_bridge.errors import Handler

TRACE_ID_HEADER = "X-Trace-ID"
DEFAULT_SERVICE_NAME = "sie-bridge"
STATUS_SERVICE = status_pb2.DESCRIPTOR.services_by_name["StatusService"].full_name
_TRACE_ID = web.RequestKey("sie_trace_id", str)


@web.middleware
async def remember_trace_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside the request's span: keep its trace id for the response's header."""
    trace_id = trace_id_hex()
    if trace_id is not None:
        request[_TRACE_ID] = trace_id
    return await handler(request)


async def stamp_trace_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response that leaves, however it was made, gets the id."""
    trace_id = request.get(_TRACE_ID)
    if trace_id is not None:
        response.headers[TRACE_ID_HEADER] = trace_id


def _server_span_middleware(provider: trace.TracerProvider) -> Any:
    """The instrumentation's middleware, tracing with ``provider``.

    The middleware reads module state (excluded URLs, the semantic-convention mode, its request
    meters) that only ``AioHttpServerInstrumentor.instrument`` sets. That call also replaces
    ``web.Application`` process-wide with a subclass adding the middleware to every application;
    ``uninstrument`` puts it back at once, so only the bridge's app is traced, with its own
    provider. Under OpenTelemetry's auto-instrumentation every application is traced already.
    """
    instrumentor = aiohttp_server.AioHttpServerInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return None
    with warnings.catch_warnings():
        # aiohttp discourages subclassing web.Application (a DeprecationWarning); the subclass
        # the instrumentor makes is dropped by the next line.
        warnings.filterwarnings(
            "ignore",
            message="Inheritance class .* from web.Application is discouraged",
            category=DeprecationWarning,
        )
        instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
    instrumentor.uninstrument()
    return aiohttp_server.create_aiohttp_middleware(tracer_provider=provider)


class BridgeTracing:
    def __init__(
        self, provider: trace.TracerProvider, *, owned: SdkTracerProvider | None = None
    ) -> None:
        """``owned``: the provider built here (``provider`` itself), which ``shutdown`` flushes
        and closes; a provider handed over is left to its owner."""
        self._provider = provider
        self._owned = owned

    @classmethod
    def from_settings(cls, settings: BridgeSettings) -> BridgeTracing:
        """The provider handed over in ``settings.tracer_provider``, else one exporting OTLP to
        ``--otlp-endpoint`` as ``--service-name``."""
        if settings.tracer_provider is not None:
            return cls(settings.tracer_provider)
        provider = otlp_tracer_provider(
            settings.service_name, DEFAULT_SERVICE_NAME, settings.otlp_endpoint
        )
        return cls(provider, owned=provider)

    def client_interceptors(self) -> list[Any]:
        """For the backend channel: a client span per call, ``traceparent`` in its metadata.

        Not for the status stream: the instrumentation ends a stream's span when the stream is
        read to its end, and the bridge's never are (``/metrics`` takes one message, the
        ``/ws/status`` relay runs as long as its socket), so their spans would never end.
        """
        untraced = negate(service_name(STATUS_SERVICE))
        interceptors = aio_client_interceptors(tracer_provider=self._provider, filter_=untraced)  # type: ignore[no-untyped-call]
        return list(interceptors)

    def install(self, app: web.Application) -> None:
        """Trace ``app`` (before it starts): the server span outermost, then the trace id kept
        for ``X-Trace-ID``; the exporter flushed at cleanup."""
        app.middlewares.insert(0, remember_trace_id)
        server_span = _server_span_middleware(self._provider)
        if server_span is not None:
            app.middlewares.insert(0, server_span)
        app.on_response_prepare.append(stamp_trace_id)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.shutdown)  # may wait on the collector

    def shutdown(self) -> None:
        if self._owned is not None:
            self._owned.shutdown()
