"""``GET /openapi.json``: an OpenAPI 3.1 document of every route the bridge serves.

The document is generated from the code it describes, so it cannot drift silently:

* request bodies take their keys from ``sie_sdk.convert.to_proto`` (``ITEM_KEYS``, ``ENCODE_PARAM_KEYS``,
  ``EXTRACT_PARAM_KEYS``) and ``routes.openai.KEYS``, closed with ``additionalProperties: false``
  exactly where the bridge refuses unknown keys; a key without a schema in ``FIELDS`` fails the
  build (so the bridge's tests) instead of going undocumented;
* error responses are grouped by the HTTP status of each reason's row in ``sie_sdk.reasons``,
  with ``Retry-After`` wherever a reason of that status carries a retry hint; the error code enum
  is every reason name plus the two codes only aiohttp's routing produces (``HTTP_ONLY_CODES``);
* the ``X-*-Time`` header names come from ``responses.timing_headers``, the dtype and model state
  enums from the proto.

Schemas are written in a small notation (``rec``) to keep this module readable:
``"name:type other?:Type[]"``, where ``?`` marks an optional field, a capitalised type is a
``$ref`` to a component, ``[]`` an array, ``{T}`` a map of T, ``T|null`` a nullable scalar, and a
field without a type takes its schema from the keyword arguments or from ``FIELDS``.

``tests/bridge/test_openapi.py`` holds the paths to the app's routes and the request schemas to
the bridge's parsers. The document is built once, when the route is added, and served as JSON.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web
from sie_sdk.convert.from_proto import timing_headers
from sie_sdk.convert.to_proto import ENCODE_PARAM_KEYS, EXTRACT_PARAM_KEYS, ITEM_KEYS
from sie_sdk.prometheus import CONTENT_TYPE as PROMETHEUS
from sie_sdk.reasons import REASONS, reason_names
from sie_sdk.tensors import DTYPE_NAMES
from sie_sdk.v1 import common_pb2, models_pb2
from sie_sdk.wire import JSON, MSGPACK, dump_json

from sie_bridge import __version__
from sie_bridge.negotiate import VERSION_HEADER
from sie_bridge.routes.openai import KEYS as EMBEDDINGS_KEYS

Schema = dict[str, Any]

#: Error codes the bridge answers that no ``sie.v1.ErrorReason`` names (aiohttp's routing).
HTTP_ONLY_CODES = ("NOT_FOUND", "METHOD_NOT_ALLOWED")
#: Reasons any backend call can end with, whatever it asks (UNAUTHENTICATED: with API keys).
UPSTREAM_REASONS = ("BACKEND_UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL_ERROR", "UNAUTHENTICATED")
#: Every ``X-*-Time`` header (``X-Postprocessing-Time`` is sent only when > 0).
TIMING_HEADERS = tuple(timing_headers(common_pb2.Timing(postprocessing_ms=1.0)))
MODEL_STATES = [
    name.removeprefix("MODEL_STATE_").lower()
    for name in models_pb2.ModelState.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
    if name != "MODEL_STATE_UNSPECIFIED"
]
ARRAYS = (
    "Arrays are (nested) number lists in JSON; in msgpack each is a msgpack-numpy map (bin keys "
    "nd, type, kind, shape, data) that msgpack_numpy.decode turns into an ndarray."
)
INT32: Schema = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_NAMED = ("string", "number", "integer", "boolean", "object")


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def arr(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def described(schema: Schema, text: str) -> Schema:
    return {**schema, "description": text}


def obj(props: Mapping[str, Schema], required: Iterable[str] = (), closed: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": dict(props)}
    if names := sorted(required):
        out["required"] = names
    if closed:
        out["additionalProperties"] = False
    return out


def t(spec: str) -> Schema:
    """One type of the notation (see the module docstring)."""
    if spec.endswith("[]"):
        return arr(t(spec[:-2]))
    if spec.startswith("{"):
        return {"type": "object", "additionalProperties": t(spec[1:-1])}
    if spec.endswith("|null"):
        return {"type": [spec.removesuffix("|null"), "null"]}
    if spec == "int32":
        return dict(INT32)
    return {"type": spec} if spec in _NAMED else ref(spec)


def rec(spec: str, closed: bool = False, **special: Schema) -> Schema:
    """An object from ``"name:type name?:type name ..."`` (see the module docstring)."""
    props: dict[str, Schema] = {}
    required: list[str] = []
    for field in spec.split():
        name, _, kind = field.partition(":")
        if not name.endswith("?"):
            required.append(name)
        name = name.removesuffix("?")
        props[name] = t(kind) if kind else special.get(name) or FIELDS[name]
    return obj(props, required, closed)


def keyed(keys: frozenset[str], where: str) -> dict[str, Schema]:
    """The schemas of the keys the bridge accepts in ``where`` (all optional), sorted."""
    if missing := sorted(keys - FIELDS.keys()):
        raise RuntimeError(f"openapi.FIELDS has no schema for the {where} keys {missing}")
    return {key: FIELDS[key] for key in sorted(keys)}


BYTES = described(t("string"), "base64 text in JSON, bin in msgpack") | {
    "contentEncoding": "base64"
}
#: The schema of every request key the bridge parses, by name (a shared name means the same).
FIELDS: dict[str, Schema] = {
    "query": t("Item"),
    "items": arr(t("Item"), minItems=1),
    "id": described(t("string"), "client id, echoed back"),
    "text": t("string"),
    "images": t("Blob[]"),
    "document": t("Blob"),
    "metadata": t("object"),
    "multivector": described(t("number[][]"), "a query as tokens x dims (score); msgpack: ndarray"),
    "token_ids": described(t("int32[]"), "token ids in the model's vocabulary, instead of text"),
    "output_types": described(t("string[]"), "dense, sparse, multivector (default: the profile's)"),
    "instruction": t("string"),
    "output_dtype": described(t("string"), "float32 (default), float16, int8, uint8, binary"),
    "is_query": t("boolean"),
    "options": described(t("object"), "runtime options: profile, adapter-specific keys"),
    "dimensions": described(INT32 | {"minimum": 1}, "truncate and renormalise to this size"),
    "labels": t("string[]"),
    "output_schema": described(t("object"), "JSON schema for structured extraction"),
    "model": described(t("string"), "model name, as in the path of the native routes"),
    "input": {
        "anyOf": [t("string"), t("string[]"), t("int32[]"), t("int32[][]")],
        "description": "a string, strings, token ids, or token id lists",
    },
    "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
    "user": described(t("string"), "accepted and ignored"),
}


def schemas() -> dict[str, Schema]:
    dtype = {"type": "string", "enum": sorted(set(DTYPE_NAMES.values()))}
    vec, ids, mat = (described(t(s), ARRAYS) for s in ("number[]", "integer[]", "number[][]"))
    codes = {"type": "string", "enum": [*reason_names(), *HTTP_ONLY_CODES]}
    error = rec("code message:string model?:string", code=codes)
    error["additionalProperties"] = described(t("string"), "the server's error metadata")
    openai_kind = {"type": "string", "enum": ["invalid_request_error", "server_error"]}
    embedding = {"anyOf": [t("number[]"), BYTES], "description": "base64: little-endian float32"}
    return {
        "Blob": rec("data format?", data=BYTES, format=described(t("string"), "jpeg, png, pdf")),
        "Item": obj(keyed(ITEM_KEYS, "item"), closed=True),
        "EncodeParams": obj(keyed(ENCODE_PARAM_KEYS, "encode params"), closed=True),
        "ExtractParams": obj(keyed(EXTRACT_PARAM_KEYS, "extract params"), closed=True),
        "EncodeRequest": rec("items params?:EncodeParams", closed=True),
        "ScoreRequest": rec("query items instruction? options?", closed=True),
        "ExtractRequest": rec("items params?:ExtractParams", closed=True),
        "EmbeddingsRequest": obj(keyed(EMBEDDINGS_KEYS, "embeddings"), ["model", "input"], True),
        "Timing": rec(
            "total_ms:number queue_ms:number tokenization_ms:number inference_ms:number "
            "postprocessing_ms:number"
        ),
        "DenseVector": rec("dims:integer dtype values", dtype=dtype, values=vec),
        "SparseVector": rec(
            "dims:integer dtype indices values", dtype=dtype, indices=ids, values=vec
        ),
        "MultiVector": rec(
            "token_dims:integer num_tokens:integer dtype values", dtype=dtype, values=mat
        ),
        "EncodeResult": rec(
            "id:string dense?:DenseVector sparse?:SparseVector multivector?:MultiVector "
            "num_tokens:integer truncated:boolean"
        ),
        "EncodeResponse": rec("model:string items:EncodeResult[] timing:Timing"),
        "ScoreEntry": rec("item_id:string score:number rank:integer"),
        "ScoreResponse": rec("model:string query_id:string|null scores:ScoreEntry[] timing:Timing"),
        "Entity": rec(
            "text:string label:string score:number start?:integer end?:integer bbox?:integer[]"
        ),
        "Relation": rec("head:string tail:string relation:string score:number"),
        "Classification": rec("label:string score:number"),
        "DetectedObject": rec("label:string score:number bbox:integer[]"),
        "ExtractResult": rec(
            "id:string entities:Entity[] relations:Relation[] classifications:Classification[] "
            "objects:DetectedObject[] data?:object"
        ),
        "ExtractResponse": rec("model:string items:ExtractResult[] timing:Timing"),
        "ProfileInfo": rec("is_default:boolean output_types:string[] output_similarity:{string}"),
        "ModelInfo": rec(
            "name:string inputs:string[] outputs:string[] tasks:string[] dims:{integer} "
            "loaded:boolean state device:string|null max_sequence_length:integer "
            "profiles:{ProfileInfo} error?:string",
            state={"type": "string", "enum": MODEL_STATES},
        ),
        "ModelList": rec("models:ModelInfo[]"),
        "Embedding": rec(
            "object index:integer embedding", object={"const": "embedding"}, embedding=embedding
        ),
        "Usage": rec("prompt_tokens:integer total_tokens:integer"),
        "EmbeddingsResponse": rec(
            "object model:string data:Embedding[] usage:Usage", object={"const": "list"}
        ),
        "ErrorDetail": error,
        "ErrorResponse": rec("detail:ErrorDetail"),
        "OpenAIError": rec("message:string type code:string", type=openai_kind),
        "OpenAIErrorResponse": rec("detail:ErrorDetail error:OpenAIError"),
        "StatusMessage": rec(
            "timestamp:number gpu:string loaded_models:string[] server:object gpus:object[] "
            "models:object[] counters:object histograms:object"
        ),
        "EncodeStreamLine": {
            "oneOf": [
                rec("sequence:integer result:EncodeResponse"),
                rec("sequence:integer error:ErrorDetail"),
            ],
            "description": "One line of an NDJSON encode stream: the result or the error of the "
            "request line numbered sequence (from 1, blank lines not counted)",
        },
        "BackendUnavailable": rec("backend timestamp:number", backend={"const": "unavailable"}),
    }


def _response(
    text: str, content: Mapping[str, Schema] | None = None, headers: Iterable[str] = ()
) -> Schema:
    out: Schema = {"description": text}
    out["headers"] = {name: ref(name, "headers") for name in (VERSION_HEADER, *headers)}
    if content:
        out["content"] = {media: {"schema": schema} for media, schema in content.items()}
    return out


def _errors(reasons: Iterable[str], body: str) -> dict[str, Schema]:
    """One response per HTTP status the reasons map to, plus ``default`` for aiohttp's own."""
    by_status: dict[int, list[str]] = {}
    for name in reasons:
        by_status.setdefault(REASONS[name].http_status, []).append(name)
    out: dict[str, Schema] = {}
    for status, names in sorted(by_status.items()):
        retry = ["Retry-After"] if any(REASONS[n].retry_after_s for n in names) else []
        text = f"{HTTPStatus(status).phrase}: {', '.join(names)}"
        out[str(status)] = _response(text, {JSON: ref(body)}, retry)
    out["default"] = _response(
        "Any other error, same body: 404 NOT_FOUND (no such path), 405 METHOD_NOT_ALLOWED, "
        "500 INTERNAL_ERROR",
        {JSON: ref("ErrorResponse")},
    )
    return out


def _op(
    method: str,
    op_id: str,
    summary: str,
    ok: Mapping[str, Schema],
    reasons: Iterable[str] = (),
    errors: str = "ErrorResponse",
    **extra: Any,
) -> Schema:
    responses = {**ok, **_errors(reasons, errors)}
    return {method: {"operationId": op_id, "summary": summary, "responses": responses, **extra}}


def _ok(name: str, text: str, headers: Iterable[str] = (), json_only: bool = False) -> Schema:
    media = (JSON,) if json_only else (MSGPACK, JSON)
    return {"200": _response(text, dict.fromkeys(media, ref(name)), headers)}


def _text(text: str, media: str = "text/plain") -> Schema:
    return {"200": _response(text, {media: t("string")})}


def _body(name: str) -> Schema:
    return {"required": True, "content": {m: {"schema": ref(name)} for m in (JSON, MSGPACK)}}


def paths() -> dict[str, Schema]:
    every, model = tuple(REASONS), [ref("Model", "parameters")]
    out: dict[str, Schema] = {}
    for task, summary in (
        ("encode", "Embed items: dense, sparse and multivector outputs"),
        ("score", "Score items against a query, best first (rank 0)"),
        ("extract", "Extract entities, relations, classes or structured data"),
    ):
        name, body = task.capitalize(), _body(f"{task.capitalize()}Request")
        ok = _ok(f"{name}Response", f"{name} results. {ARRAYS}", TIMING_HEADERS)
        out[f"/v1/{task}/{{model}}"] = _op(
            "post", task, summary, ok, every, parameters=model, requestBody=body
        )
    out["/v1/encode/{model}/stream"] = _stream(model)
    ok = _ok("ModelList", "The catalog")
    out["/v1/models"] = _op("get", "listModels", "Every catalog model", ok, UPSTREAM_REASONS)
    ok = _ok("ModelInfo", "The model as requests under this name see it")
    why = ("INVALID_INPUT", "MODEL_NOT_FOUND", "MODEL_LOAD_FAILED", *UPSTREAM_REASONS)
    summary = "One model, or a name:profile variant"
    out["/v1/models/{model}"] = _op("get", "getModel", summary, ok, why, parameters=model)
    ok = _ok("EmbeddingsResponse", "Embeddings (always JSON)", TIMING_HEADERS, json_only=True)
    body, summary = _body("EmbeddingsRequest"), "OpenAI-compatible embeddings"
    out["/v1/embeddings"] = _op(
        "post", "createEmbeddings", summary, ok, every, "OpenAIErrorResponse", requestBody=body
    )
    ready = {**_text("ok"), "503": _response("not ready: <why>", {"text/plain": t("string")})}
    out["/healthz"] = _op("get", "healthz", "Liveness: the bridge process is up", _text("ok"))
    out["/readyz"] = _op("get", "readyz", "Readiness: the backend's gRPC health", ready)
    metrics = _text("Prometheus text format", PROMETHEUS)
    out["/metrics"] = _op("get", "metrics", "The server's and the bridge's metrics", metrics)
    this = {"200": _response("OpenAPI 3.1", {JSON: t("object")})}
    out["/openapi.json"] = _op("get", "openapi", "This document", this)
    out["/"] = _op("get", "statusPage", "Live status page", _text("HTML", "text/html"))
    text = "Switching Protocols: one JSON text message per status snapshot (x-messages)"
    upgrade = {
        "101": {"description": f"{text}; the client only closes"},
        "400": _response("Not a WebSocket upgrade (INVALID_INPUT)", {JSON: ref("ErrorResponse")}),
    }
    messages = {"oneOf": [ref("StatusMessage"), ref("BackendUnavailable")]}
    out["/ws/status"] = _op("get", "wsStatus", "WebSocket status stream", upgrade)
    out["/ws/status"]["get"]["x-messages"] = messages
    return out


STREAM_BODY = (
    "Content-Type: application/x-ndjson, one EncodeRequest (the /v1/encode body) a line, read "
    "as it arrives; application/json is read the same way (a one-line body is a stream of one "
    "request). Any other content type is a 400 INVALID_INPUT."
)
STREAM_OK = (
    "NDJSON, streamed: one EncodeStreamLine per request line, in order. A line that is not "
    "JSON or not a valid request answers an error line and the stream goes on. If the backend "
    "fails midway the last line is an error line (e.g. BACKEND_UNAVAILABLE) and the response "
    "ends: a response with fewer lines than requests is incomplete."
)


def _stream(model: list[Schema]) -> Schema:
    """``POST /v1/encode/{model}/stream``: its errors are the checks made before the 200."""
    window = {
        "name": "window",
        "in": "query",
        "required": False,
        "schema": INT32 | {"minimum": 1},
        "description": "Requests worked on at once (default: the server's, 4; capped at 64)",
    }
    line = {"type": "string", "x-line-schema": ref("EncodeStreamLine")}
    # Only JSON is listed as content: schemathesis (tests/bridge/test_fuzz_openapi.py) has no
    # serializer for application/x-ndjson; the description names it.
    body = {
        "required": True,
        "description": STREAM_BODY,
        "content": {JSON: {"schema": ref("EncodeRequest")}},
    }
    ok = {"200": _response(STREAM_OK, {"application/x-ndjson": line})}
    why = ("INVALID_INPUT", "MODEL_NOT_FOUND", "MODEL_LOAD_FAILED", *UPSTREAM_REASONS)
    summary = "Bulk encode: NDJSON requests in, NDJSON results out, streamed"
    return _op(
        "post", "encodeStream", summary, ok, why, parameters=[*model, window], requestBody=body
    )


def components() -> Schema:
    model = {
        "name": "model",
        "in": "path",
        "required": True,
        "schema": t("string"),
        "description": "Catalog model name. It may contain '/' (BAAI/bge-m3), sent as is or as "
        "%2F (the route matches the rest of the path); a ':profile' suffix picks a profile.",
    }
    always = timing_headers(common_pb2.Timing())  # the others only when their time is > 0
    headers: dict[str, Schema] = {}
    for name in TIMING_HEADERS:
        when = "" if name in always else ", sent only when > 0"
        headers[name] = {"description": f"{name[2:-5]} time in ms{when}", "schema": t("string")}
    headers[VERSION_HEADER] = {"description": "The SIE version", "schema": t("string")}
    headers["Retry-After"] = {
        "description": "Whole seconds after which a retry may succeed",
        "schema": {"type": "integer", "minimum": 1},
    }
    return {"schemas": schemas(), "parameters": {"Model": model}, "headers": headers}


def document() -> Schema:
    """The whole OpenAPI 3.1 document (a deep copy: callers may change it freely)."""
    info = {
        "title": "SIE HTTP bridge",
        "version": __version__,
        "description": "Search inference over HTTP on top of the SIE gRPC server. Request bodies "
        "are msgpack when Content-Type is application/msgpack, else JSON. Responses are msgpack "
        "unless Accept prefers application/json; error bodies are always JSON.",
    }
    doc = {"openapi": "3.1.0", "info": info, "paths": paths(), "components": components()}
    return copy.deepcopy(doc)


def add_routes(app: web.Application) -> None:
    body = dump_json(document())

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    app.router.add_get("/openapi.json", openapi_json)
