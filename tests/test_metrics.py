"""Metrics: what a real server records for the spec's table, served on its metrics port, and the
shared Prometheus renderer on hand-built snapshots (structure, not golden text)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sie_sdk import metrics as sdk_metrics
from sie_sdk.prometheus import render
from sie_sdk.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)
from sie_server.config import load_settings
from sie_server.observability import metrics as server_metrics

from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import dense

MODEL = "tiny/metrics-dense"
PHASES = ("total", "queue", "tokenization", "inference", "postprocessing")
TEXTS = ["Metrics count what happened.", "A second, somewhat longer item to encode."]
HTTP_TIMEOUT_S = 10.0


# ---- a small parser of the Prometheus text format (0.0.4) ----------------------------------------
Labels = frozenset[tuple[str, str]]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, Labels], str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        return float(self.samples[(name, frozenset(labels.items()))])

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """(le, cumulative count) of one histogram series, in the order they were written."""
        out = []
        for (n, key), raw in self.samples.items():
            found = dict(key)
            le = found.pop("le", None)
            if n == f"{name}_bucket" and found == labels and le is not None:
                out.append((float(le.replace("+Inf", "inf")), float(raw)))
        return out


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> Exposition:
    assert text.endswith("\n")
    out = Exposition()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in out.helps, f"two HELP lines for {name}"
            out.helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name not in out.types, f"two TYPE lines for {name}"
            assert kind in ("counter", "gauge", "histogram"), line
            out.types[name] = kind
            out.order.append(name)
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, raw_labels, value = match.groups()
            pairs = _LABEL.findall(raw_labels or "")
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == (raw_labels or ""), line
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            family = family if family in out.types else name
            assert family == out.order[-1], f"{name} outside its family's block"
            key = (name, frozenset((k, unescape(v)) for k, v in pairs))
            assert key not in out.samples, f"duplicate series {line!r}"
            float(value)
            out.samples[key] = value
    return out


def assert_histograms_consistent(exposition: Exposition) -> int:
    """Every histogram series: buckets ascending and cumulative, +Inf equals _count."""
    checked = 0
    for name, kind in exposition.types.items():
        if kind != "histogram":
            continue
        for labels in exposition.series(f"{name}_count"):
            buckets = exposition.buckets(name, **labels)
            bounds = [le for le, _ in buckets]
            counts = [count for _, count in buckets]
            assert bounds == sorted(bounds), (name, labels)
            assert bounds[-1] == math.inf, (name, labels)
            assert counts == sorted(counts), (name, labels, counts)
            assert counts[-1] == exposition.value(f"{name}_count", **labels)
            exposition.value(f"{name}_sum", **labels)
            checked += 1
    return checked


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    async def get() -> tuple[int, dict[str, str], str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        head, _, body = raw.decode().partition("\r\n\r\n")
        status_line, *header_lines = head.split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)
        }
        if method != "HEAD":
            assert int(headers["content-length"]) == len(body.encode())
        return int(status_line.split()[1]), headers, body

    return await asyncio.wait_for(get(), HTTP_TIMEOUT_S)


# ---- a real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metrics")
    folder = root / "catalog"
    write_catalog_entry(
        folder,
        {
            "name": MODEL,
            "adapter": "dense",
            "weights_path": str(dense.build_tiny_dense(root / "dense")),
            "max_sequence_length": 128,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
    )
    return folder


@pytest_asyncio.fixture
async def server(catalog: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog], preload=[MODEL], metrics_port=0) as handle:
        yield handle


async def test_metrics_port_serves_the_spec_metrics_after_real_calls(server: ServerHandle) -> None:
    encode = encode_pb2_grpc.EncodeServiceStub(server.channel)
    ok = await encode.Encode(
        encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=t) for t in TEXTS])
    )
    with pytest.raises(grpc.RpcError) as failed:
        await encode.Encode(encode_pb2.EncodeRequest(model=MODEL, items=[]))
    assert error_info(failed.value)[0] == "INVALID_INPUT"
    models = models_pb2_grpc.ModelServiceStub(server.channel)
    await models.ListModels(models_pb2.ListModelsRequest())
    await models.GetModel(models_pb2.GetModelRequest(name=MODEL))
    with pytest.raises(grpc.RpcError):
        await models.GetModel(models_pb2.GetModelRequest(name="no/such-model"))

    port = server.running.metrics_port
    assert port
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    exposition = parse(body)

    # sie_requests_total{model, endpoint, status}: one per call made, integers.
    assert exposition.types["sie_requests_total"] == "counter"
    assert {k: v for (n, k), v in exposition.samples.items() if n == "sie_requests_total"} == {
        frozenset({("model", MODEL), ("endpoint", "encode"), ("status", "ok")}): "1",
        frozenset({("model", MODEL), ("endpoint", "encode"), ("status", "INVALID_INPUT")}): "1",
        frozenset({("model", ""), ("endpoint", "list_models"), ("status", "ok")}): "1",
        frozenset({("model", MODEL), ("endpoint", "get_model"), ("status", "ok")}): "1",
        frozenset({("model", ""), ("endpoint", "get_model"), ("status", "MODEL_NOT_FOUND")}): "1",
    }

    # sie_request_duration_seconds{model, endpoint, phase}: one observation per ok request.
    assert exposition.types["sie_request_duration_seconds"] == "histogram"
    duration_series = exposition.series("sie_request_duration_seconds_count")
    assert sorted(s["phase"] for s in duration_series) == sorted(PHASES)
    for phase in PHASES:
        labels = {"model": MODEL, "endpoint": "encode", "phase": phase}
        assert exposition.value("sie_request_duration_seconds_count", **labels) == 1
        assert exposition.value("sie_request_duration_seconds_sum", **labels) >= 0
    total = {"model": MODEL, "endpoint": "encode", "phase": "total"}
    assert exposition.value("sie_request_duration_seconds_sum", **total) > 0

    # sie_tokens_processed_total{model}: the tokens the responses report.
    assert exposition.types["sie_tokens_processed_total"] == "counter"
    tokens = sum(item.num_tokens for item in ok.items)
    assert tokens > len(TEXTS)
    assert exposition.samples[("sie_tokens_processed_total", frozenset({("model", MODEL)}))] == (
        str(tokens)
    )

    # sie_batch_size{model}: every item rode in a batch (warm-up runs inline, unrecorded).
    assert exposition.types["sie_batch_size"] == "histogram"
    assert exposition.value("sie_batch_size_sum", model=MODEL) == len(TEXTS)
    assert exposition.value("sie_batch_size_count", model=MODEL) >= 1

    # Gauges from the models of the snapshot.
    snapshot = await anext(
        aiter(
            status_pb2_grpc.StatusServiceStub(server.channel).WatchStatus(
                status_pb2.WatchStatusRequest()
            )
        )
    )
    memory = next(m.memory_bytes for m in snapshot.models if m.name == MODEL)
    assert memory > 0
    for name in ("sie_queue_depth", "sie_model_loaded", "sie_model_memory_bytes"):
        assert exposition.types[name] == "gauge"
    assert exposition.value("sie_queue_depth", model=MODEL) == 0
    assert exposition.value("sie_model_loaded", model=MODEL, device="cpu") == 1
    assert exposition.value("sie_model_memory_bytes", model=MODEL, device="cpu") == memory

    for name in ("sie_requests_total", "sie_request_duration_seconds", "sie_batch_size"):
        assert exposition.helps[name]
    assert assert_histograms_consistent(exposition) >= len(PHASES) + 1


async def test_metrics_port_refuses_other_paths_and_closes_with_the_server(catalog: Path) -> None:
    async with serving([catalog], metrics_port=0) as handle:
        port = handle.running.metrics_port
        assert port
        status, _, _ = await http_get(port, "/other")
        assert status == 404
        status, headers, _ = await http_get(port, "/metrics", method="POST")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        status, _, _ = await http_get(port, "/metrics", method="NOT AN HTTP REQUEST")
        assert status == 400
        status, headers, body = await http_get(port, "/metrics", method="HEAD")
        assert (status, body) == (200, "")
        assert int(headers["content-length"]) > 0
        status, _, body = await http_get(port, "/metrics?name[]=x")
        assert status == 200
        assert "sie_model_loaded" in body  # the model is in the catalog, not loaded
        assert parse(body).value("sie_model_loaded", model=MODEL, device="") == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), HTTP_TIMEOUT_S)


async def test_no_metrics_port_unless_asked(catalog: Path) -> None:
    async with serving([catalog]) as handle:
        assert handle.running.metrics_port is None


def test_metrics_port_setting() -> None:
    assert load_settings([], {}).metrics_port is None
    assert load_settings(["--metrics-port", "0"], {}).metrics_port == 0
    assert load_settings([], {"SIE_METRICS_PORT": "9464"}).metrics_port == 9464
    assert load_settings(["--metrics-port", "1"], {"SIE_METRICS_PORT": "2"}).metrics_port == 1


# ---- the renderer on hand-built snapshots --------------------------------------------------------
def hand_built_snapshot() -> status_pb2.WatchStatusResponse:
    store = sdk_metrics.Metrics()
    store.inc("sie_requests_total", model="m", endpoint="encode", status="ok")
    store.inc("sie_requests_total", 2, model='we"ird\\na\nme', endpoint="encode", status="ok")
    store.inc("sie_tokens_processed_total", 7, model="m")
    for value in (0.0005, 0.001, 0.003, 0.2, 99.0):  # 0.001 lands in le="0.001"
        store.observe(
            "sie_request_duration_seconds",
            value,
            server_metrics.SECONDS_BUCKETS,
            model="m",
            endpoint="encode",
            phase="total",
        )
    for size in (1, 3, 3, 300):
        store.observe("sie_batch_size", size, server_metrics.BATCH_SIZE_BUCKETS, model="m")
    return status_pb2.WatchStatusResponse(
        models=[
            status_pb2.ModelStatus(
                name="m", state="loaded", device="cuda:0", memory_bytes=1234, queue_pending_items=5
            ),
            status_pb2.ModelStatus(name="idle", state="available"),
        ],
        counters=store.counter_samples(),
        histograms=store.histogram_samples(),
    )


def test_renderer_structure_on_a_hand_built_snapshot() -> None:
    extra = status_pb2.HistogramSample(
        name="sie_bridge_request_seconds",
        labels={"route": "/v1/encode"},
        bounds=[0.1, 1.0],
        counts=[1, 0, 2],
        sum=5.5,
        count=3,
    )
    text = render(
        hand_built_snapshot(),
        counters=[status_pb2.CounterSample(name="sie_bridge_requests_total", value=4)],
        histograms=[extra],
        help_texts={"sie_bridge_requests_total": "Bridge requests\nby route"},
    )
    exposition = parse(text)
    assert exposition.order == sorted(exposition.order)
    assert exposition.types == {
        "sie_batch_size": "histogram",
        "sie_bridge_request_seconds": "histogram",
        "sie_bridge_requests_total": "counter",
        "sie_model_loaded": "gauge",
        "sie_model_memory_bytes": "gauge",
        "sie_queue_depth": "gauge",
        "sie_request_duration_seconds": "histogram",
        "sie_requests_total": "counter",
        "sie_tokens_processed_total": "counter",
    }
    assert exposition.helps["sie_bridge_requests_total"] == "Bridge requests\\nby route"
    assert assert_histograms_consistent(exposition) == 3

    # Label values with quotes, backslashes and newlines survive escaping.
    weird = {"model": 'we"ird\\na\nme', "endpoint": "encode", "status": "ok"}
    assert exposition.samples[("sie_requests_total", frozenset(weird.items()))] == "2"
    assert exposition.value("sie_bridge_requests_total") == 4

    duration = {"model": "m", "endpoint": "encode", "phase": "total"}
    buckets = dict(exposition.buckets("sie_request_duration_seconds", **duration))
    assert buckets[0.001] == 2  # le is inclusive
    assert buckets[0.0025] == 2
    assert buckets[0.005] == 3
    assert buckets[0.25] == 4
    assert buckets[math.inf] == 5
    assert exposition.value("sie_request_duration_seconds_sum", **duration) == pytest.approx(
        0.0005 + 0.001 + 0.003 + 0.2 + 99.0
    )
    assert exposition.value("sie_batch_size_count", model="m") == 4
    assert dict(exposition.buckets("sie_batch_size", model="m"))[256.0] == 3
    assert dict(exposition.buckets("sie_bridge_request_seconds", route="/v1/encode")) == {
        0.1: 1,
        1.0: 1,
        math.inf: 3,
    }

    assert exposition.value("sie_queue_depth", model="m") == 5
    assert exposition.value("sie_queue_depth", model="idle") == 0
    assert exposition.value("sie_model_loaded", model="m", device="cuda:0") == 1
    assert exposition.value("sie_model_loaded", model="idle", device="") == 0
    assert exposition.value("sie_model_memory_bytes", model="m", device="cuda:0") == 1234
    # Counters stay integers.
    assert exposition.samples[("sie_tokens_processed_total", frozenset({("model", "m")}))] == "7"


def test_renderer_refuses_inconsistent_input() -> None:
    assert render(None) == ""
    clash = status_pb2.CounterSample(name="sie_queue_depth", labels={"model": "m"}, value=1)
    with pytest.raises(ValueError, match="sie_queue_depth"):
        render(hand_built_snapshot(), counters=[clash])
    bad = status_pb2.HistogramSample(name="h", bounds=[1.0], counts=[1, 1], sum=1.0, count=3)
    with pytest.raises(ValueError, match="histogram h"):
        render(histograms=[bad])


def test_server_metrics_reexport_the_shared_store() -> None:
    assert server_metrics.Metrics is sdk_metrics.Metrics
    assert server_metrics.Histogram is sdk_metrics.Histogram
