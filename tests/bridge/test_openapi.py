"""``GET /openapi.json`` against the bridge it describes: the paths equal the app's routes, the
document is well-formed OpenAPI 3.1, the request schemas accept the spec's curl bodies and the
same keys the bridge's parsers accept, the response schemas fit what ``responses.py`` builds, and
the error responses follow the reason table. No network: the app is built, never connected."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import struct_pb2
from sie_bridge import __version__, openapi
from sie_bridge.app import create_app
from sie_bridge.config import BridgeSettings
from sie_bridge.errors import _HTTP_CODES
from sie_bridge.routes import openai
from sie_bridge.state import UPSTREAM
from sie_bridge.upstream import Upstream
from sie_sdk.convert import from_proto as responses
from sie_sdk.convert import to_proto as requests
from sie_sdk.reasons import REASONS, reason_names
from sie_sdk.tensors import to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, extract_pb2, models_pb2, score_pb2
from sie_sdk.wire import WireError, dump_json

DOC = openapi.document()
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

# The request bodies of the curl examples in shared/spec/http-api-reference.md, verbatim.
SPEC_EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("EncodeRequest", {"items": [{"text": "Hello, world!"}]}),
    (
        "EncodeRequest",
        {
            "items": [{"text": "Search query"}],
            "params": {
                "output_types": ["dense", "sparse"],
                "instruction": "Represent this query for retrieval:",
            },
        },
    ),
    (
        "ScoreRequest",
        {
            "query": {"text": "What is machine learning?"},
            "items": [
                {"id": "doc-1", "text": "ML uses algorithms to learn from data."},
                {"id": "doc-2", "text": "The weather is sunny today."},
            ],
        },
    ),
    (
        "ExtractRequest",
        {
            "items": [{"text": "Tim Cook is the CEO of Apple Inc."}],
            "params": {"labels": ["person", "organization", "role"]},
        },
    ),
    (
        "ExtractRequest",
        {
            "items": [{"text": "<long review text...>"}],
            "params": {
                "labels": ["positive", "negative", "neutral"],
                "options": {"overflow_policy": "truncate_text"},
            },
        },
    ),
    ("EmbeddingsRequest", {"model": "BAAI/bge-m3", "input": ["Hello, world!"]}),
]
PARSERS: dict[str, Callable[[Any], object]] = {
    "EncodeRequest": lambda body: requests.encode_request("m", body),
    "ScoreRequest": lambda body: requests.score_request("m", body),
    "ExtractRequest": lambda body: requests.extract_request("m", body),
    "EmbeddingsRequest": openai.encode_request,
}


def make_app() -> web.Application:
    settings = BridgeSettings()
    app = create_app(settings, Upstream(settings))
    if not any(route.resource.canonical == "/openapi.json" for route in _routes(app)):
        openapi.add_routes(app)  # until app.py mounts the group itself
    return app


def _routes(app: web.Application) -> Iterator[web.AbstractRoute]:
    return (route for route in app.router.routes() if route.resource is not None)


@pytest.fixture
async def app() -> AsyncIterator[web.Application]:
    app = make_app()
    yield app
    await app[UPSTREAM].close()


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = DOC
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(node["$ref"])
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method, path, op


def conforms(value: Any, schema: Any, where: str = "$") -> None:
    """The keys of ``value`` against ``schema``: required present, none undeclared in a closed
    object, each property recursively (a key-level check that needs no jsonschema)."""
    schema = deref(schema)
    if "anyOf" in schema or "oneOf" in schema:
        return
    if schema.get("type") == "array":
        assert isinstance(value, list), where
        for index, entry in enumerate(value):
            conforms(entry, schema["items"], f"{where}[{index}]")
    elif schema.get("type") == "object" and "properties" in schema:
        assert isinstance(value, dict), where
        assert set(schema.get("required", ())) <= set(value), (where, sorted(value))
        extra = set(value) - set(schema["properties"])
        assert not extra or schema.get("additionalProperties") not in (None, False), (where, extra)
        for key in set(value) & set(schema["properties"]):
            conforms(value[key], schema["properties"][key], f"{where}.{key}")


def test_paths_equal_the_apps_routes(app: web.Application) -> None:
    served = {
        (route.method.lower(), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical))
        for route in _routes(app)
        if route.method != "HEAD"
    }
    documented = {(method, path) for method, path, _ in operations()}
    assert documented == served
    assert ("post", "/v1/encode/{model}") in documented
    assert "101" in DOC["paths"]["/ws/status"]["get"]["responses"]


def test_document_is_valid_openapi_3_1() -> None:
    if importlib.util.find_spec("openapi_spec_validator") is not None:
        from openapi_spec_validator import validate

        validate(DOC)
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["title"]
    assert DOC["info"]["version"] == __version__
    for pointer in refs(DOC):
        resolve(pointer)  # raises KeyError when the target is missing
    op_ids = [op["operationId"] for _, _, op in operations()]
    assert len(op_ids) == len(set(op_ids)) == len(list(operations()))
    for method, path, op in operations():
        assert op["responses"], (method, path)
        for status, response in op["responses"].items():
            assert status == "default" or re.fullmatch(r"[1-5]\d\d", status), (path, status)
            assert deref(response)["description"], (path, status)
        params = [deref(p) for p in op.get("parameters", [])]
        in_path = {p["name"] for p in params if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{(\w+)\}", path)), (method, path)
        assert all(p["required"] is True for p in params if p["in"] == "path")
    model = deref(DOC["paths"]["/v1/encode/{model}"]["post"]["parameters"][0])
    assert "'/'" in model["description"]


@pytest.mark.parametrize(("name", "body"), SPEC_EXAMPLES)
def test_spec_examples_fit_the_schemas_and_the_bridge(name: str, body: dict[str, Any]) -> None:
    PARSERS[name](body)  # the bridge itself takes the example
    conforms(body, {"$ref": f"#/components/schemas/{name}"})


@pytest.mark.parametrize(("name", "body"), SPEC_EXAMPLES)
def test_request_schemas_validate_examples_and_refuse_unknown_keys(
    name: str, body: dict[str, Any]
) -> None:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed: the full JSON Schema check is skipped"
    )
    op = next(op for _, _, op in operations() if _body_is(op, name))
    content = op["requestBody"]["content"]
    assert set(content) == {"application/json", "application/msgpack"}
    for media in content.values():
        validator = jsonschema.Draft202012Validator({**media["schema"], **DOC})
        validator.validate(body)
        assert not validator.is_valid({**body, "unknown_key": 1})
        if "items" in body:
            bad_item = {**body, "items": [{**body["items"][0], "unknown_key": 1}]}
            assert not validator.is_valid(bad_item)
        if "params" in body:
            assert not validator.is_valid({**body, "params": {**body["params"], "zzz": 1}})


def _body_is(op: dict[str, Any], name: str) -> bool:
    content = op.get("requestBody", {}).get("content", {})
    return any(m["schema"] == {"$ref": f"#/components/schemas/{name}"} for m in content.values())


BASES = {
    "EncodeRequest": {"items": [{"text": "x"}]},
    "ScoreRequest": {"query": {"text": "q"}, "items": [{"text": "x"}]},
    "ExtractRequest": {"items": [{"text": "x"}]},
    "EmbeddingsRequest": {"model": "m", "input": "x"},
}
# (closed schema, request schema whose parser reads it, where its keys go in the body)
CLOSED: list[tuple[str, str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]]] = [
    *((name, name, lambda base, keys: {**base, **keys}) for name in BASES),
    ("Item", "EncodeRequest", lambda base, keys: {"items": [{"text": "x", **keys}]}),
    ("Item", "ScoreRequest", lambda base, keys: {**base, "query": {"text": "q", **keys}}),
    ("EncodeParams", "EncodeRequest", lambda base, keys: {**base, "params": keys}),
    ("ExtractParams", "ExtractRequest", lambda base, keys: {**base, "params": keys}),
]


def test_closed_schemas_are_exactly_where_the_bridge_refuses_unknown_keys() -> None:
    closed = {
        name
        for name, schema in DOC["components"]["schemas"].items()
        if schema.get("additionalProperties") is False
    }
    assert closed == {name for name, _, _ in CLOSED}


@pytest.mark.parametrize(
    ("schema", "request_name", "place"), CLOSED, ids=[f"{s}-in-{r}" for s, r, _ in CLOSED]
)
def test_schema_keys_are_the_keys_the_bridge_accepts(
    schema: str, request_name: str, place: Callable[..., dict[str, Any]]
) -> None:
    parse, base = PARSERS[request_name], BASES[request_name]
    properties = DOC["components"]["schemas"][schema]["properties"]
    with pytest.raises(WireError, match="unknown field") as refused:
        parse(place(base, {"not_a_documented_key": None}))
    known = re.search(r"\(known: ([^)]*)\)", str(refused.value))  # the bridge lists its keys
    assert known is not None, str(refused.value)
    assert set(properties) == set(known.group(1).split(", ")), schema


def test_error_codes_are_the_reason_table_plus_http_only_codes() -> None:
    detail = DOC["components"]["schemas"]["ErrorDetail"]
    codes = detail["properties"]["code"]["enum"]
    assert set(codes) == {*reason_names(), "NOT_FOUND", "METHOD_NOT_ALLOWED"}
    assert len(codes) == len(set(codes))
    assert set(_HTTP_CODES.values()) <= set(codes)
    error = deref(DOC["components"]["schemas"]["ErrorResponse"]["properties"]["detail"])
    assert error is detail
    assert detail["required"] == ["code", "message"]


def test_error_responses_follow_the_reason_table() -> None:
    statuses = {str(row.http_status) for row in REASONS.values()}
    retrying = {str(row.http_status) for row in REASONS.values() if row.retry_after_s}
    assert retrying == {"503"}
    for task in ("encode", "score", "extract"):
        responses_ = DOC["paths"][f"/v1/{task}/{{model}}"]["post"]["responses"]
        assert set(responses_) == {"200", "default", *statuses}
        for status, response in responses_.items():
            assert "X-SIE-Server-Version" in response["headers"]
            assert ("Retry-After" in response["headers"]) == (status in retrying), status
        assert set(openapi.TIMING_HEADERS) <= set(responses_["200"]["headers"])
        assert {"X-Total-Time", "X-Inference-Time"} <= set(responses_["200"]["headers"])
    embeddings = DOC["paths"]["/v1/embeddings"]["post"]["responses"]
    assert deref(embeddings["503"]["content"]["application/json"]["schema"]) is deref(
        {"$ref": "#/components/schemas/OpenAIErrorResponse"}
    )
    listing = DOC["paths"]["/v1/models"]["get"]["responses"]
    assert "404" not in listing
    assert {"503", "504"} <= set(listing)
    assert "404" in DOC["paths"]["/v1/models/{model}"]["get"]["responses"]


def _tensor(array: Any, dtype: Any) -> common_pb2.Tensor:
    return to_tensor(np.asarray(array), dtype)


def test_response_schemas_fit_what_the_bridge_builds() -> None:
    timing = common_pb2.Timing(total_ms=2.0, inference_ms=1.0, postprocessing_ms=0.5)
    f32, i32 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_INT32
    encoded = encode_pb2.EncodeResponse(model="m", timing=timing)
    result = encoded.items.add(id="a", num_tokens=3, truncated=False)
    result.dense.dims = 2
    result.dense.values.CopyFrom(_tensor([0.5, 1.0], f32))
    result.sparse.dims = 9
    result.sparse.indices.CopyFrom(_tensor([1, 7], i32))
    result.sparse.values.CopyFrom(_tensor([0.1, 0.2], f32))
    result.multivector.token_dims, result.multivector.num_tokens = 2, 3
    result.multivector.values.CopyFrom(_tensor(np.ones((3, 2)), f32))
    scored = score_pb2.ScoreResponse(model="m", timing=timing)
    scored.scores.add(item_id="a", score=0.5, rank=0)
    extracted = extract_pb2.ExtractResponse(model="m", timing=timing)
    entry = extracted.items.add(id="a", data=struct_pb2.Struct())
    entry.entities.add(text="Tim", label="person", score=0.9, start=0, end=3, bbox=[1, 2, 3, 4])
    entry.relations.add(head="Tim", tail="Apple", relation="ceo_of", score=0.8)
    entry.classifications.add(label="positive", score=0.7)
    entry.objects.add(label="cat", score=0.6, bbox=[0, 0, 5, 5])
    info = models_pb2.ModelInfo(name="m", loaded=True, device="cpu", error="old failure")
    info.profiles["default"].output_types.append("dense")
    info.profiles["default"].output_similarity["dense"] = "cosine"
    built = {
        "EncodeResponse": responses.encode_response(encoded),
        "ScoreResponse": responses.score_response(scored),
        "ExtractResponse": responses.extract_response(extracted),
        "ModelList": {"models": [responses.model_info(info)]},
    }
    jsonschema = importlib.util.find_spec("jsonschema")
    for name, payload in built.items():
        value = json.loads(dump_json(payload))  # the JSON form: arrays as lists
        conforms(value, {"$ref": f"#/components/schemas/{name}"})
        if jsonschema is not None:
            import jsonschema as js

            js.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **DOC}).validate(value)
    ok = DOC["paths"]["/v1/encode/{model}"]["post"]["responses"]["200"]
    assert "msgpack-numpy" in ok["description"]
    item = json.loads(dump_json(built["EncodeResponse"]))["items"][0]
    assert set(item) == set(DOC["components"]["schemas"]["EncodeResult"]["properties"])


async def test_get_openapi_json_serves_the_document() -> None:
    async with TestClient(TestServer(make_app())) as client:
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert "X-SIE-Server-Version" in response.headers
        assert await response.json() == openapi.document()
