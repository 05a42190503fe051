"""OpenTelemetry pieces the server and the bridge share (docs/observability.md).

Imported only when a service runs with tracing on: this module imports OpenTelemetry
(``pip install 'sie[tracing]'``), which nothing else in SIE does.

``otlp_tracer_provider`` builds the provider a service uses when none is handed to it: spans go
in batches to an OTLP/gRPC collector. With ``endpoint`` None the exporter follows OpenTelemetry's
own variables (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, then ``OTEL_EXPORTER_OTLP_ENDPOINT``, then
``http://localhost:4317``); an ``http://`` endpoint is plaintext, ``https://`` TLS. Sampling
follows ``OTEL_TRACES_SAMPLER`` (default: every trace, children as their parent).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = ["otlp_tracer_provider", "service_resource", "trace_id_hex"]


def service_resource(service_name: str | None, default: str) -> Resource:
    """The resource naming the service: ``service_name`` when given, else ``OTEL_SERVICE_NAME``
    (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``), else ``default``."""
    resource = Resource.create({SERVICE_NAME: service_name} if service_name else {})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default}))
    return resource


def otlp_tracer_provider(
    service_name: str | None, default_service_name: str, endpoint: str | None
) -> TracerProvider:
    """A provider exporting every ended span, batched, to the OTLP/gRPC ``endpoint``."""
    provider = TracerProvider(resource=service_resource(service_name, default_service_name))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def trace_id_hex(span: trace.Span | None = None) -> str | None:
    """The 32-hex-digit trace id of ``span`` (default: the current one); None without a valid
    span (tracing off for this call, or outside any traced request)."""
    context = (span or trace.get_current_span()).get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
