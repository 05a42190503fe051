"""Tracing and structured logs (docs/observability.md).

With an in-memory span exporter shared by a server and a bridge in this process: one HTTP encode
through the bridge is one trace (aiohttp server span -> gRPC client span -> gRPC server span ->
``sie.batch`` span linked to the request), and ``X-Trace-ID`` is its id; a batch of two requests
links both; gRPC callers continue their own trace and get the id back in ``x-trace-id`` trailing
metadata (on errors too); health probes are not traced. With tracing off there are no spans and
no headers, and neither service imports OpenTelemetry. ``--log-format json`` writes one JSON
object a line carrying the current span's ids. Flags and the OTLP provider are checked last.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp.web_app
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sie_bridge.config import load_settings as load_bridge_settings
from sie_sdk.logs import JsonFormatter, log_handler
from sie_sdk.tracing import otlp_tracer_provider, service_resource
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.config import load_settings
from sie_server.observability.tracing import NO_TRACING

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged
from tests.fakes import FakeAdapter
from tests.server_utils import (
    ServerHandle,
    error_info,
    eventually,
    fake_entry,
    serving,
    write_catalog_entry,
)

FAKE = "fake/tracing"
ENCODE_METHOD = "/sie.v1.EncodeService/Encode"
AIOHTTP_SCOPE = "opentelemetry.instrumentation.aiohttp_server"
BATCH = "sie.batch"
#: A caller's W3C trace context (the example of the W3C Trace Context specification).
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def body(text: str) -> dict[str, object]:
    return {"items": [{"text": text}]}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tracing") / "catalog"
    write_catalog_entry(folder, fake_entry(FAKE))
    return folder


@pytest.fixture(scope="module")
def memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider the test owns (never the global one), exporting every span as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def exporter(memory: tuple[TracerProvider, InMemorySpanExporter]) -> InMemorySpanExporter:
    memory[1].clear()
    return memory[1]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(
    catalog: Path, memory: tuple[TracerProvider, InMemorySpanExporter]
) -> AsyncIterator[ServerHandle]:
    async with serving([catalog], [FAKE], tracing=True, tracer_provider=memory[0]) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bridge(
    server: ServerHandle, memory: tuple[TracerProvider, InMemorySpanExporter]
) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address, tracing=True, tracer_provider=memory[0]) as handle:
        yield handle


def spans_of(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and s.context.trace_id == int(trace_id, 16)
    ]


def one(spans: list[ReadableSpan], what: str, **match: object) -> ReadableSpan:
    found = [s for s in spans if all(_field(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{what}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


def _field(span: ReadableSpan, name: str) -> object:
    if name == "scope":
        return span.instrumentation_scope.name if span.instrumentation_scope else None
    return getattr(span, name)


def has_chain(spans: list[ReadableSpan]) -> bool:
    """The four spans of one HTTP encode have all ended."""
    names = [(s.name, s.kind) for s in spans]
    return (
        (ENCODE_METHOD, SpanKind.CLIENT) in names
        and (ENCODE_METHOD, SpanKind.SERVER) in names
        and (BATCH, SpanKind.INTERNAL) in names
        and any(_field(s, "scope") == AIOHTTP_SCOPE for s in spans)
    )


async def post_encode(bridge: BridgeHandle, text: str) -> str:
    """An HTTP encode through the bridge; its X-Trace-ID."""
    async with bridge.session.post(
        f"/v1/encode/{FAKE}", json=body(text), headers=JSON_HEADERS
    ) as response:
        assert response.status == 200, await response.text()
        reply = await response.json()
        assert len(reply["items"][0]["dense"]["values"]) == 2
        return response.headers["X-Trace-ID"]


# ---- one trace from the HTTP request to the batch ---------------------------------------------------


async def test_one_trace_from_http_request_to_batch(
    bridge: BridgeHandle, exporter: InMemorySpanExporter
) -> None:
    trace_id = await post_encode(bridge, "hello world")
    assert len(trace_id) == 32
    assert int(trace_id, 16) != 0
    await eventually(lambda: has_chain(spans_of(exporter, trace_id)), "the trace's spans ended")
    spans = spans_of(exporter, trace_id)

    http = one(spans, "aiohttp server span", scope=AIOHTTP_SCOPE, kind=SpanKind.SERVER)
    client = one(spans, "gRPC client span", name=ENCODE_METHOD, kind=SpanKind.CLIENT)
    server = one(spans, "gRPC server span", name=ENCODE_METHOD, kind=SpanKind.SERVER)
    batch = one(spans, "batch span", name=BATCH)
    assert http.context is not None
    assert client.context is not None
    assert server.context is not None
    assert batch.context is not None
    # HTTP -> gRPC client -> (traceparent over the wire) gRPC server -> batch.
    assert http.parent is None
    assert client.parent is not None
    assert client.parent.span_id == http.context.span_id
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.parent.is_remote
    assert batch.parent is not None
    assert batch.parent.span_id == server.context.span_id
    # The batch is linked to the request whose item it ran.
    linked = [(link.context.trace_id, link.context.span_id) for link in batch.links]
    assert linked == [(server.context.trace_id, server.context.span_id)]
    assert batch.links[0].attributes == {"sie.batch.items": 1}

    attributes = dict(batch.attributes or {})
    assert attributes["sie.model"] == FAKE
    assert attributes["sie.batch.items"] == 1
    assert attributes["sie.batch.requests"] == 1
    assert attributes["sie.batch.tokens"] == 4  # BOS, two words, EOS
    assert attributes["sie.batch.padded_tokens"] == 4
    assert isinstance(attributes["sie.batch.id"], int)
    assert isinstance(attributes["sie.batch.inference_ms"], float)
    assert batch.status.status_code is StatusCode.UNSET
    # The batch's forward pass lies inside the gRPC call that waited for it.
    assert batch.start_time is not None
    assert batch.end_time is not None
    assert server.start_time is not None
    assert server.end_time is not None
    assert server.start_time <= batch.start_time <= batch.end_time <= server.end_time
    assert server.attributes is not None
    assert server.attributes["rpc.service"] == "sie.v1.EncodeService"


async def test_a_batch_links_every_request_in_it(
    server: ServerHandle, bridge: BridgeHandle, exporter: InMemorySpanExporter
) -> None:
    entry = server.running.registry.entry(FAKE)
    adapter, executor = entry.adapter, entry.executor
    assert isinstance(adapter, FakeAdapter)
    assert executor is not None
    started = adapter.passes_started
    adapter.hold()
    try:
        first = asyncio.create_task(post_encode(bridge, "alone"))
        await eventually(lambda: adapter.passes_started == started + 1, "the first batch runs")
        # Same length, so the padding cap keeps them together in the next batch.
        pair = [asyncio.create_task(post_encode(bridge, text)) for text in ("one two", "six ten")]
        await eventually(lambda: executor.queued_items == 2, "both requests are queued")
    finally:
        adapter.release()
    await first
    trace_ids = await asyncio.gather(*pair)
    assert len(set(trace_ids)) == 2  # two requests, two traces

    def batch_of_two() -> list[ReadableSpan]:
        return [
            s
            for s in exporter.get_finished_spans()
            if s.name == BATCH and s.attributes and s.attributes["sie.batch.items"] == 2
        ]

    await eventually(lambda: len(batch_of_two()) == 1, "the batch of two ended")
    # Only one of the two traces holds the batch span (see below): wait for their server spans.
    await eventually(
        lambda: all(
            any(
                s.name == ENCODE_METHOD and s.kind is SpanKind.SERVER for s in spans_of(exporter, t)
            )
            for t in trace_ids
        ),
        "both requests' server spans ended",
    )
    (batch,) = batch_of_two()
    servers = {
        t: one(spans_of(exporter, t), "gRPC server span", name=ENCODE_METHOD, kind=SpanKind.SERVER)
        for t in trace_ids
    }
    expected = {(s.context.trace_id, s.context.span_id) for s in servers.values() if s.context}
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked == expected
    assert batch.attributes is not None
    assert batch.attributes["sie.batch.requests"] == 2
    # It sits in the trace of one of them (the first admitted), and links the other.
    assert batch.parent is not None
    assert (batch.parent.trace_id, batch.parent.span_id) in expected


# ---- gRPC callers ------------------------------------------------------------------------------------


async def test_grpc_caller_continues_its_trace_and_gets_the_id_back(
    server: ServerHandle, exporter: InMemorySpanExporter
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    traceparent = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
    request = encode_pb2.EncodeRequest(model=FAKE, items=[common_pb2.Item(text="hello")])
    call = stub.Encode(request, metadata=traceparent)
    await call
    assert dict(await call.trailing_metadata())["x-trace-id"] == CALLER_TRACE
    await eventually(lambda: len(spans_of(exporter, CALLER_TRACE)) == 2, "server and batch spans")
    spans = spans_of(exporter, CALLER_TRACE)
    rpc = one(spans, "gRPC server span", name=ENCODE_METHOD, kind=SpanKind.SERVER)
    assert rpc.parent is not None
    assert rpc.parent.span_id == int(CALLER_SPAN, 16)
    assert rpc.parent.is_remote
    one(spans, "batch span", name=BATCH)

    # A failed call keeps its error details and carries the id too.
    missing = encode_pb2.EncodeRequest(model="no/such-model", items=[common_pb2.Item(text="x")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(missing, metadata=traceparent)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value)[0] == "MODEL_NOT_FOUND"
    assert dict(caught.value.trailing_metadata() or ())["x-trace-id"] == CALLER_TRACE

    # A call without a trace context starts a trace of its own.
    fresh = stub.Encode(request)
    await fresh
    own = dict(await fresh.trailing_metadata())["x-trace-id"]
    assert isinstance(own, str)
    assert own != CALLER_TRACE
    assert len(own) == 32


async def test_health_probes_are_not_traced(
    server: ServerHandle, exporter: InMemorySpanExporter
) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # An encode afterwards is traced, so the exporter was live when the probe ran.
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    await stub.Encode(encode_pb2.EncodeRequest(model=FAKE, items=[common_pb2.Item(text="a")]))
    await eventually(
        lambda: any(s.name == ENCODE_METHOD for s in exporter.get_finished_spans()), "encode span"
    )
    assert not [s for s in exporter.get_finished_spans() if "Health" in s.name]


# ---- the bridge's other responses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [("/readyz", 200), ("/metrics", 200), ("/healthz", 200), ("/no/such/route", 404)],
)
async def test_every_bridge_response_carries_its_trace_id(
    bridge: BridgeHandle, exporter: InMemorySpanExporter, path: str, status: int
) -> None:
    async with bridge.session.get(path) as response:
        assert response.status == status
        await response.read()
        trace_id = response.headers["X-Trace-ID"]
    await eventually(
        lambda: any(_field(s, "scope") == AIOHTTP_SCOPE for s in spans_of(exporter, trace_id)),
        "the request's span ended",
    )
    if path == "/readyz":  # asks the backend's health: the call is in the same trace
        await eventually(
            lambda: any(s.kind is SpanKind.CLIENT for s in spans_of(exporter, trace_id)),
            "the backend call's span ended",
        )


async def test_the_bridge_continues_an_http_callers_trace(
    bridge: BridgeHandle, exporter: InMemorySpanExporter
) -> None:
    headers = {**JSON_HEADERS, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    async with bridge.session.post(
        f"/v1/encode/{FAKE}", json=body("hi"), headers=headers
    ) as response:
        assert response.status == 200
        assert response.headers["X-Trace-ID"] == CALLER_TRACE
    await eventually(lambda: has_chain(spans_of(exporter, CALLER_TRACE)), "the trace ended")
    http = one(spans_of(exporter, CALLER_TRACE), "aiohttp span", scope=AIOHTTP_SCOPE)
    assert http.parent is not None
    assert http.parent.span_id == int(CALLER_SPAN, 16)


def test_instrumenting_the_bridge_leaves_other_aiohttp_apps_alone(bridge: BridgeHandle) -> None:
    """The instrumentor swaps ``web.Application`` while it initializes; it is put back."""
    assert web.Application is aiohttp.web_app.Application
    assert not web.Application().middlewares


# ---- tracing off ---------------------------------------------------------------------------------


async def test_tracing_off_adds_no_spans_and_no_headers(
    catalog: Path, exporter: InMemorySpanExporter, memory: tuple[TracerProvider, object]
) -> None:
    provider = memory[0]  # handed over, but tracing is off: never used
    async with (
        serving([catalog], [FAKE], tracer_provider=provider) as server,
        bridged(server.address, tracer_provider=provider) as http,
    ):
        assert server.running.registry.config.executor.tracing is NO_TRACING
        headers = {**JSON_HEADERS, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        async with http.session.post(
            f"/v1/encode/{FAKE}", json=body("hello"), headers=headers
        ) as response:
            assert response.status == 200
            assert "X-Trace-ID" not in response.headers
        stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
        call = stub.Encode(encode_pb2.EncodeRequest(model=FAKE, items=[common_pb2.Item(text="a")]))
        await call
        assert "x-trace-id" not in dict(await call.trailing_metadata())
    assert exporter.get_finished_spans() == ()


def test_nothing_imports_opentelemetry_with_tracing_off() -> None:
    code = """
import sys
from sie_server.config import load_settings
from sie_server.observability.tracing import server_tracing
from sie_bridge.app import bridge_tracing
from sie_bridge.config import load_settings as load_bridge_settings
import sie_server.cli, sie_server.grpc_api.server, sie_bridge.cli, sie_bridge.upstream

assert server_tracing(load_settings([], {})).capture() is None
assert bridge_tracing(load_bridge_settings([], {})) is None
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
server_tracing(load_settings(["--tracing"], {})).shutdown()
bridge_tracing(load_bridge_settings(["--tracing"], {})).shutdown()
print(any(name.startswith("opentelemetry") for name in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


# ---- JSON logs ---------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = log_handler("json")
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, JsonFormatter)
    handler.setStream(stream)
    logger = logging.getLogger("tests.tracing.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_json_log_lines_carry_the_current_trace(
    json_log: tuple[logging.Logger, io.StringIO], memory: tuple[TracerProvider, object]
) -> None:
    logger, stream = json_log
    logger.info("outside %s", "any span")
    with memory[0].get_tracer("tests").start_as_current_span("work") as span:
        logger.warning("inside %d", 1)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    outside, inside, failed = lines
    assert set(outside) == {"time", "level", "logger", "message"}
    assert outside["level"] == "INFO"
    assert outside["logger"] == "tests.tracing.json"
    assert outside["message"] == "outside any span"
    assert outside["time"].endswith("+00:00")
    context = span.get_span_context()
    assert inside["message"] == "inside 1"
    assert inside["level"] == "WARNING"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert failed["trace_id"] == inside["trace_id"]
    assert "ValueError: boom" in failed["exception"]


def test_log_format_settings() -> None:
    assert load_settings([], {}).log_format == "text"
    assert load_settings(["--log-format", "json"], {}).log_format == "json"
    assert load_settings([], {"SIE_LOG_FORMAT": "json"}).log_format == "json"
    assert load_bridge_settings([], {"SIE_BRIDGE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SystemExit, match="--log-format"):
        load_settings(["--log-format", "xml"], {})
    with pytest.raises(SystemExit, match="--log-format"):
        load_bridge_settings([], {"SIE_BRIDGE_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="log format"):
        log_handler("xml")


# ---- flags and the exporter -------------------------------------------------------------------------


def test_tracing_flags() -> None:
    off = load_settings([], {})
    assert (off.tracing, off.otlp_endpoint, off.service_name) == (False, None, None)
    assert load_settings(["--tracing"], {}).tracing is True
    assert load_settings(["--tracing", "false"], {"SIE_TRACING": "1"}).tracing is False
    assert load_settings([], {"SIE_TRACING": "true"}).tracing is True
    on = load_settings(
        [], {"SIE_TRACING": "on", "SIE_OTLP_ENDPOINT": "http://c:4317", "SIE_SERVICE_NAME": "s"}
    )
    assert (on.tracing, on.otlp_endpoint, on.service_name) == (True, "http://c:4317", "s")
    with pytest.raises(SystemExit, match="SIE_TRACING"):
        load_settings([], {"SIE_TRACING": "maybe"})
    bridge = load_bridge_settings(
        [], {"SIE_BRIDGE_TRACING": "yes", "SIE_BRIDGE_OTLP_ENDPOINT": "https://c:4317"}
    )
    assert (bridge.tracing, bridge.otlp_endpoint) == (True, "https://c:4317")
    assert load_bridge_settings(["--tracing", "no"], {}).tracing is False
    assert load_bridge_settings(["--service-name", "edge"], {}).service_name == "edge"


def test_service_name_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service_resource(None, "sie-server").attributes["service.name"] == "sie-server"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert service_resource(None, "sie-server").attributes["service.name"] == "from-env"
    assert service_resource("flag", "sie-server").attributes["service.name"] == "flag"


def test_otlp_provider_names_the_service() -> None:
    provider = otlp_tracer_provider("sie-test", "sie-server", "http://127.0.0.1:9")
    try:
        assert provider.resource.attributes["service.name"] == "sie-test"
    finally:
        provider.shutdown()  # nothing was recorded, so nothing is sent
