"""The bridge's documented API against a real server with tiny real-architecture models and the
embedded MiniLM: the spec's curl examples, msgpack that decodes with msgpack-numpy into arrays equal
to the gRPC results bit for bit, JSON, the original SDK's request shapes, headers, and models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.catalog import BUILTIN_CATALOG_DIR

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged, pack, unpack
from tests.server_utils import ServerHandle, serving, write_catalog_entry
from tests.tiny_models import bge_m3, classifiers, dense, gliclass, gliner
from tests.tiny_models.entries import (
    BGE_M3_OUTPUTS,
    DENSE_OUTPUTS,
    JSON_OUTPUTS,
    SCORE_OUTPUTS,
    entry,
)

pytestmark = pytest.mark.filterwarnings(classifiers.DEBERTA_JIT_WARNING)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["Hello, world!", "Dynamic batching groups concurrent requests.", "x"]


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bridge-api")
    entries = [
        entry(
            "tiny/dense",
            "dense",
            dense.build_tiny_dense(root / "dense"),
            DENSE_OUTPUTS,
            profiles={
                "default": {"output_types": ["dense"]},
                "retrieval": {
                    "output_types": ["dense"],
                    "options": {"query_template": "query: {text}"},
                },
            },
        ),
        entry("tiny/bge-m3", "bge_m3", bge_m3.build_tiny_bge_m3(root / "bge-m3"), BGE_M3_OUTPUTS),
        entry(
            "tiny/reranker",
            "cross_encoder",
            classifiers.build_bert_classifier(root / "reranker"),
            SCORE_OUTPUTS,
            max_sequence_length=64,
        ),
        entry("tiny/gliner", "gliner", gliner.build_tiny_gliner(root / "gliner"), JSON_OUTPUTS),
        entry(
            "tiny/gliclass",
            "gliclass",
            gliclass.build_tiny_gliclass(root / "gliclass"),
            JSON_OUTPUTS,
            max_sequence_length=64,
        ),
    ]
    for item in entries:
        write_catalog_entry(root / "catalog", item)
    return root / "catalog"


PRELOAD = ["tiny/dense", "tiny/bge-m3", "tiny/reranker", "tiny/gliner", "tiny/gliclass", MINILM]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir, BUILTIN_CATALOG_DIR], preload=PRELOAD) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


async def grpc_encode(server: ServerHandle, model: str, **params: Any) -> encode_pb2.EncodeResponse:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    options = params.pop("options", None)
    request = encode_pb2.EncodeRequest(
        model=model,
        items=[common_pb2.Item(text=t) for t in TEXTS],
        params=encode_pb2.EncodeParams(**params),
    )
    if options:
        request.params.options.update(options)
    return await stub.Encode(request)


async def post_json(http: BridgeHandle, path: str, body: Any) -> tuple[int, Any, Any]:
    async with http.session.post(path, json=body, headers=JSON_HEADERS) as response:
        return response.status, await response.json(), response.headers


async def post_msgpack(http: BridgeHandle, path: str, body: Any) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/msgpack"}
    async with http.session.post(path, data=pack(body), headers=headers) as response:
        assert response.content_type == "application/msgpack"
        return response.status, unpack(await response.read()), response.headers


# ---- the spec's curl examples ------------------------------------------------------------------


async def test_basic_encoding_example_on_minilm(http: BridgeHandle, server: ServerHandle) -> None:
    status, body, headers = await post_json(
        http, f"/v1/encode/{MINILM}", {"items": [{"text": "Hello, world!"}]}
    )
    assert status == 200
    assert body["model"] == MINILM
    [item] = body["items"]
    assert item["dense"]["dims"] == 384
    assert item["dense"]["dtype"] == "float32"
    assert len(item["dense"]["values"]) == 384
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    want = await stub.Encode(
        encode_pb2.EncodeRequest(model=MINILM, items=[common_pb2.Item(text="Hello, world!")])
    )
    assert np.array_equal(
        np.asarray(item["dense"]["values"], dtype=np.float32),
        from_tensor(want.items[0].dense.values),
    )
    assert item["num_tokens"] == want.items[0].num_tokens
    for header in ("X-Total-Time", "X-Queue-Time", "X-Tokenization-Time", "X-Inference-Time"):
        assert float(headers[header]) >= 0.0
    assert float(headers["X-Total-Time"]) == pytest.approx(body["timing"]["total_ms"], abs=1e-3)
    assert headers["X-SIE-Server-Version"]


async def test_multiple_output_types_example(http: BridgeHandle) -> None:
    status, body, _ = await post_json(
        http,
        "/v1/encode/tiny/bge-m3",
        {
            "items": [{"text": "Search query"}],
            "params": {
                "output_types": ["dense", "sparse"],
                "instruction": "Represent this query for retrieval:",
            },
        },
    )
    assert status == 200, body
    [item] = body["items"]
    assert set(item) >= {"dense", "sparse"}
    assert "multivector" not in item
    assert item["dense"]["dims"] == bge_m3.HIDDEN
    sparse = item["sparse"]
    assert sparse["dims"] == 1000
    assert sparse["dtype"] == "float32"
    assert len(sparse["indices"]) == len(sparse["values"]) > 0
    assert all(isinstance(i, int) for i in sparse["indices"])


async def test_score_example(http: BridgeHandle) -> None:
    status, body, _ = await post_json(
        http,
        "/v1/score/tiny/reranker",
        {
            "query": {"text": "What is machine learning?"},
            "items": [
                {"id": "doc-1", "text": "ML uses algorithms to learn from data."},
                {"id": "doc-2", "text": "The weather is sunny today."},
            ],
        },
    )
    assert status == 200, body
    assert body["model"] == "tiny/reranker"
    assert body["query_id"] is None
    scores = body["scores"]
    assert sorted(s["item_id"] for s in scores) == ["doc-1", "doc-2"]
    assert [s["rank"] for s in scores] == [0, 1]
    assert scores[0]["score"] >= scores[1]["score"]


async def test_extract_example(http: BridgeHandle) -> None:
    status, body, _ = await post_json(
        http,
        "/v1/extract/tiny/gliner",
        {
            "items": [{"text": "Tim Cook is the CEO of Apple Inc."}],
            "params": {"labels": ["person", "organization", "role"]},
        },
    )
    assert status == 200, body
    assert body["model"] == "tiny/gliner"
    [item] = body["items"]
    assert item["id"] == "item-0"
    text = "Tim Cook is the CEO of Apple Inc."
    for entity in item["entities"]:
        assert entity["label"] in {"person", "organization", "role"}
        assert text[entity["start"] : entity["end"]] == entity["text"]
        assert 0.0 <= entity["score"] <= 1.0


async def test_gliclass_overflow_examples(http: BridgeHandle) -> None:
    long_text = " ".join(["battery"] * 200)
    labels = ["positive", "negative", "neutral"]
    status, body, _ = await post_json(
        http,
        "/v1/extract/tiny/gliclass",
        {
            "items": [{"text": long_text}],
            "params": {"labels": labels, "options": {"overflow_policy": "truncate_text"}},
        },
    )
    assert status == 200, body
    assert sorted(c["label"] for c in body["items"][0]["classifications"]) == sorted(labels)
    status, body, _ = await post_json(
        http,
        "/v1/extract/tiny/gliclass",
        {
            "items": [{"text": long_text}],
            "params": {"labels": labels, "options": {"overflow_policy": "error"}},
        },
    )
    assert status == 400
    detail = body["detail"]
    assert detail["code"] == "INPUT_TOO_LONG"
    assert detail["message"].startswith("Item 0: observed ")
    assert "exceeds context cap 64 for tiny/gliclass" in detail["message"]
    assert detail["model"] == "tiny/gliclass"


async def test_models_example(http: BridgeHandle) -> None:
    async with http.session.get("/v1/models", headers={"Accept": "application/json"}) as r:
        assert r.status == 200
        models = {m["name"]: m for m in (await r.json())["models"]}
    assert set(PRELOAD) <= set(models)
    minilm = models[MINILM]
    assert minilm["inputs"] == ["text"]
    assert minilm["dims"] == {"dense": 384}
    assert minilm["loaded"] is True
    assert minilm["state"] == "loaded"
    assert minilm["max_sequence_length"] > 0
    reranker = models["tiny/reranker"]
    assert reranker["outputs"] == ["score"]
    assert reranker["dims"] == {}
    profiles = models["tiny/dense"]["profiles"]
    assert profiles["default"]["is_default"] is True
    assert profiles["retrieval"]["is_default"] is False
    assert profiles["retrieval"]["output_types"] == ["dense"]
    for model in models.values():
        for profile in model["profiles"].values():
            assert set(profile["output_similarity"]) <= set(profile["output_types"])
    async with http.session.get("/v1/models/tiny/bge-m3") as r:  # msgpack by default
        assert r.status == 200
        one = unpack(await r.read())
    assert one == models["tiny/bge-m3"]


async def test_health_examples(http: BridgeHandle) -> None:
    for path in ("/healthz", "/readyz"):
        async with http.session.get(path) as response:
            assert response.status == 200
            assert await response.text() == "ok"


# ---- msgpack: the original SIE SDK's wire ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "binary"])
async def test_msgpack_arrays_equal_grpc_bit_for_bit(
    http: BridgeHandle, server: ServerHandle, dtype: str
) -> None:
    outputs = ["dense", "sparse", "multivector"]
    status, body, _ = await post_msgpack(
        http,
        "/v1/encode/tiny/bge-m3",
        {
            "items": [{"text": t} for t in TEXTS],
            "params": {"output_types": outputs, "output_dtype": dtype},
        },
    )
    assert status == 200, body
    want = await grpc_encode(server, "tiny/bge-m3", output_types=outputs, output_dtype=dtype)
    for got, ref in zip(body["items"], want.items, strict=True):
        pairs = [
            (got["dense"]["values"], ref.dense.values),
            (got["sparse"]["indices"], ref.sparse.indices),
            (got["sparse"]["values"], ref.sparse.values),
            (got["multivector"]["values"], ref.multivector.values),
        ]
        for array, tensor in pairs:
            expected = from_tensor(tensor)
            assert isinstance(array, np.ndarray)
            assert array.dtype == expected.dtype
            assert array.shape == expected.shape
            assert array.tobytes() == expected.tobytes()
        assert got["multivector"]["num_tokens"] == ref.multivector.num_tokens
        assert got["num_tokens"] == ref.num_tokens
        assert got["truncated"] is ref.truncated


async def test_is_query_inside_options_equals_the_typed_grpc_field(
    http: BridgeHandle, server: ServerHandle
) -> None:
    # The original SDK sends is_query inside params.options (msgpack body).
    status, body, _ = await post_msgpack(
        http,
        "/v1/encode/tiny/dense",
        {
            "items": [{"text": t} for t in TEXTS],
            "params": {"options": {"profile": "retrieval", "is_query": True}},
        },
    )
    assert status == 200
    query = await grpc_encode(server, "tiny/dense", is_query=True, options={"profile": "retrieval"})
    document = await grpc_encode(server, "tiny/dense", options={"profile": "retrieval"})
    for got, as_query, as_doc in zip(body["items"], query.items, document.items, strict=True):
        vector = got["dense"]["values"]
        assert vector.tobytes() == from_tensor(as_query.dense.values).tobytes()
        assert vector.tobytes() != from_tensor(as_doc.dense.values).tobytes()


async def test_json_and_msgpack_carry_the_same_result(http: BridgeHandle) -> None:
    body = {"items": [{"id": "a", "text": TEXTS[1]}], "params": {"output_types": ["sparse"]}}
    _, as_json, _ = await post_json(http, "/v1/encode/tiny/bge-m3", body)
    _, as_msgpack, _ = await post_msgpack(http, "/v1/encode/tiny/bge-m3", body)
    j, m = as_json["items"][0], as_msgpack["items"][0]
    assert j["id"] == m["id"] == "a"
    assert j["sparse"]["indices"] == m["sparse"]["indices"].tolist()
    assert np.array_equal(
        np.asarray(j["sparse"]["values"], dtype=np.float32), m["sparse"]["values"]
    )


async def test_accept_negotiation(http: BridgeHandle) -> None:
    body = pack({"items": [{"text": "hi"}]})
    cases = {
        None: "application/msgpack",
        "*/*": "application/msgpack",
        "application/msgpack": "application/msgpack",
        "application/json": "application/json",
        "application/json, */*;q=0.1": "application/json",
        "application/msgpack;q=0.5, application/json": "application/json",
    }
    for accept, want in cases.items():
        headers = {"Content-Type": "application/msgpack"}
        if accept is not None:
            headers["Accept"] = accept
        async with http.session.post("/v1/encode/tiny/dense", data=body, headers=headers) as r:
            assert r.status == 200
            assert r.content_type == want, accept


async def test_a_json_query_multivector_scores_like_grpc(http: BridgeHandle) -> None:
    # A precomputed query multivector travels as nested lists in JSON, as an array in msgpack.
    _, encoded, _ = await post_msgpack(
        http,
        "/v1/encode/tiny/bge-m3",
        {"items": [{"text": "query text"}], "params": {"output_types": ["multivector"]}},
    )
    query = encoded["items"][0]["multivector"]["values"]
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    _, as_json, _ = await post_json(
        http, "/v1/score/tiny/bge-m3", {"query": {"multivector": query.tolist()}, "items": docs}
    )
    _, as_msgpack, _ = await post_msgpack(
        http, "/v1/score/tiny/bge-m3", {"query": {"multivector": query}, "items": docs}
    )
    assert as_json["scores"] == as_msgpack["scores"]
    assert len(as_json["scores"]) == len(TEXTS)


async def test_metrics_hold_the_spec_table_and_the_bridges_own(http: BridgeHandle) -> None:
    await post_json(http, "/v1/encode/tiny/dense", {"items": [{"text": "counted"}]})
    async with http.session.get("/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    assert types["sie_requests_total"] == "counter"
    assert types["sie_request_duration_seconds"] == "histogram"
    assert types["sie_batch_size"] == "histogram"
    assert types["sie_tokens_processed_total"] == "counter"
    assert types["sie_queue_depth"] == "gauge"
    assert types["sie_model_loaded"] == "gauge"
    assert types["sie_model_memory_bytes"] == "gauge"
    assert types["sie_bridge_requests_total"] == "counter"
    assert types["sie_bridge_request_duration_seconds"] == "histogram"
    assert 'sie_model_loaded{device="cpu",model="tiny/dense"} 1' in text
    ok = 'sie_requests_total{endpoint="encode",model="tiny/dense",status="ok"} '
    assert any(line.startswith(ok) and int(line.split()[-1]) >= 1 for line in text.splitlines())
    bridge_ok = 'sie_bridge_requests_total{method="POST",route="/v1/encode/{model}",status="200"} '
    assert any(line.startswith(bridge_ok) for line in text.splitlines()), text
