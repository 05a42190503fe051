"""``POST /v1/embeddings``: the OpenAI embeddings API on top of Encode.

``input`` is a string, a list of strings, a list of token ids, or a list of such lists (token ids
in the model's own vocabulary: the server decodes them with its tokenizer). ``encoding_format`` is
``float`` (lists) or ``base64`` (little-endian float32 bytes, what the ``openai`` package asks for
by default). ``dimensions`` truncates and renormalises on the server where the model allows it,
else 400. ``usage`` counts the tokens the model really processed. Responses are always JSON.
Errors carry the spec's ``detail`` body plus OpenAI's ``error`` object, so both kinds of client
read them.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from aiohttp import web
from sie_sdk.convert import to_proto as requests
from sie_sdk.convert.from_proto import timing_headers
from sie_sdk.convert.to_proto import invalid_input
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2
from sie_sdk.wire import JSON, WireError, dump_json

from sie_bridge.errors import BridgeError, error_body, error_headers
from sie_bridge.errors import invalid_input as invalid_request
from sie_bridge.negotiate import read_body
from sie_bridge.state import UPSTREAM

KEYS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def _items(value: Any) -> list[common_pb2.Item]:
    if isinstance(value, str):
        return [common_pb2.Item(text=value)]
    if not isinstance(value, list) or not value:
        raise invalid_input("input must be a string, a list of strings, or token id lists")
    if all(isinstance(v, str) for v in value):
        return [common_pb2.Item(text=v) for v in value]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [common_pb2.Item(token_ids=_ids(value, "input"))]
    if all(isinstance(v, list) for v in value):
        return [common_pb2.Item(token_ids=_ids(v, f"input[{i}]")) for i, v in enumerate(value)]
    raise invalid_input("input mixes strings, token ids and lists")


def _ids(value: list[Any], where: str) -> list[int]:
    if not value:
        raise invalid_input(f"{where} is an empty token list")
    item = requests.item({"token_ids": value}, where)
    return list(item.token_ids)


def encode_request(body: Any) -> tuple[encode_pb2.EncodeRequest, str]:
    if not isinstance(body, dict):
        raise invalid_input("body must be an object")
    unknown = sorted(set(body) - KEYS)
    if unknown:
        raise invalid_input(f"unknown field {unknown[0]} (known: {', '.join(sorted(KEYS))})")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_input("model is required")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid_input(f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    message = encode_pb2.EncodeRequest(model=model, items=_items(body.get("input")))
    message.params.output_types.append("dense")
    message.params.output_dtype = "float32"
    if body.get("dimensions") is not None:
        message.params.dimensions = requests.positive_int(body["dimensions"], "dimensions")
    return message, encoding


def _embedding(values: common_pb2.Tensor, encoding: str) -> list[float] | str:
    array = from_tensor(values)
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()
    return array.tolist()  # type: ignore[no-any-return]


async def embeddings(request: web.Request) -> web.Response:
    try:
        message, encoding = encode_request(await read_body(request))
        upstream = request.app[UPSTREAM]
        reply = await upstream.call(upstream.encode.Encode, message)
    except WireError as exc:
        return _openai_error(invalid_request(str(exc)))
    except BridgeError as exc:
        return _openai_error(exc)
    payload = {
        "object": "list",
        "model": reply.model,
        "data": [
            {"object": "embedding", "index": i, "embedding": _embedding(r.dense.values, encoding)}
            for i, r in enumerate(reply.items)
        ],
        "usage": {
            "prompt_tokens": sum(r.num_tokens for r in reply.items),
            "total_tokens": sum(r.num_tokens for r in reply.items),
        },
    }
    return web.Response(
        body=dump_json(payload), content_type=JSON, headers=timing_headers(reply.timing)
    )


def _openai_error(exc: BridgeError) -> web.Response:
    detail = exc.detail
    body = error_body(detail)
    kind = "invalid_request_error" if detail.http_status < 500 else "server_error"
    body["error"] = {"message": detail.message, "type": kind, "code": detail.reason.lower()}
    return web.Response(
        status=detail.http_status,
        body=dump_json(body),
        content_type=JSON,
        headers=error_headers(detail),
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
