"""Request bodies in the HTTP API's shape -> protobuf requests, checking shapes and types.

A wrong shape raises ``WireError`` naming the field (the bridge answers 400 INVALID_INPUT; the
SDK raises ``RequestError`` before anything is sent).

Only the wire shape is checked here (types, unknown keys). What the values mean (a known output
type, an option the model reads, a profile) is the server's job: it answers INVALID_INPUT with the
same messages on both transports.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from sie_sdk.tensors import to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, extract_pb2, score_pb2
from sie_sdk.wire import WireError


def invalid_input(message: str) -> WireError:
    return WireError(message)


ITEM_KEYS = frozenset({"id", "text", "images", "document", "metadata", "multivector", "token_ids"})
ENCODE_PARAM_KEYS = frozenset(
    {"output_types", "instruction", "output_dtype", "is_query", "options", "dimensions"}
)
EXTRACT_PARAM_KEYS = frozenset({"labels", "output_schema", "instruction", "options"})


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise invalid_input(f"{where} must be an object, got {type(value).__name__}")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise invalid_input(f"{where} has a non-string key {bad[0]!r}")
    return value


def _check_keys(value: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(key for key in value if key not in allowed)
    if unknown:
        raise invalid_input(
            f"unknown field {where}.{unknown[0]} (known: {', '.join(sorted(allowed))})"
        )


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise invalid_input(f"{where} must be a string, got {type(value).__name__}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list | tuple):
        raise invalid_input(f"{where} must be a list of strings")
    return [_string(item, f"{where}[{index}]") for index, item in enumerate(value)]


def _bytes(value: Any, where: str) -> bytes:
    """msgpack sends bin; JSON sends base64 text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_input(f"{where} must be bytes (base64 in JSON)") from None
    raise invalid_input(f"{where} must be bytes (base64 in JSON), got {type(value).__name__}")


def _struct(value: Any, where: str) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    try:
        out.update(_mapping(value, where))
    except (ValueError, TypeError, OverflowError) as exc:
        raise invalid_input(f"{where} holds a value JSON cannot carry: {exc}") from None
    return out


def item(value: Any, where: str) -> common_pb2.Item:
    raw = _mapping(value, where)
    _check_keys(raw, ITEM_KEYS, where)
    out = common_pb2.Item()
    if "id" in raw and raw["id"] is not None:
        out.id = _string(raw["id"], f"{where}.id")
    if raw.get("text") is not None:
        out.text = _string(raw["text"], f"{where}.text")
    images = raw.get("images") or ()
    if not isinstance(images, list | tuple):
        raise invalid_input(f"{where}.images must be a list of images")
    for index, image in enumerate(images):
        at = f"{where}.images[{index}]"
        image = _mapping(image, at)
        out.images.add(
            data=_bytes(image.get("data"), f"{at}.data"),
            format=_string(image.get("format", ""), f"{at}.format"),
        )
    if raw.get("document") is not None:
        document = _mapping(raw["document"], f"{where}.document")
        out.document.data = _bytes(document.get("data"), f"{where}.document.data")
        out.document.format = _string(document.get("format", ""), f"{where}.document.format")
    if raw.get("metadata") is not None:
        out.metadata.CopyFrom(_struct(raw["metadata"], f"{where}.metadata"))
    if raw.get("multivector") is not None:
        out.multivector.CopyFrom(_multivector(raw["multivector"], f"{where}.multivector"))
    if raw.get("token_ids") is not None:
        out.token_ids.extend(_token_ids(raw["token_ids"], f"{where}.token_ids"))
    return out


def _multivector(value: Any, where: str) -> common_pb2.Tensor:
    """A 2-D array of finite numbers (booleans, nulls, strings and integers past float range are
    refused, not coerced)."""
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise invalid_input(f"{where} must be a 2-D array of numbers") from None
    if raw.dtype.kind not in "iuf":
        raise invalid_input(f"{where} must be a 2-D array of numbers")
    if raw.ndim != 2:
        raise invalid_input(f"{where} must be 2-D (tokens x dims), got shape {raw.shape}")
    with np.errstate(over="ignore"):
        array = raw.astype(np.float32)
    if not np.isfinite(array).all():
        raise invalid_input(f"{where} holds NaN or infinite values (or values past float32)")
    return to_tensor(array, common_pb2.DTYPE_FLOAT32)


def _token_ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise invalid_input(f"{where} must be a list of integers")
    if any(not -(2**31) <= t < 2**31 for t in value):
        raise invalid_input(f"{where} holds an id outside int32")
    return list(value)


def items(value: Any, where: str = "items") -> list[common_pb2.Item]:
    if value is None:
        raise invalid_input(f"{where} is required")
    if not isinstance(value, list | tuple):
        raise invalid_input(f"{where} must be a list of items")
    return [item(entry, f"{where}[{index}]") for index, entry in enumerate(value)]


def _optional_string(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    return None if value is None else _string(value, f"{where}.{key}")


def _body(value: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    body = _mapping(value, "body")
    _check_keys(body, allowed, "body")
    return body


def encode_request(model: str, value: Any) -> encode_pb2.EncodeRequest:
    body = _body(value, frozenset({"items", "params"}))
    params = _mapping(body.get("params") or {}, "params")
    _check_keys(params, ENCODE_PARAM_KEYS, "params")
    out = encode_pb2.EncodeRequest(model=model, items=items(body.get("items")))
    p = out.params
    if params.get("output_types") is not None:
        p.output_types.extend(_strings(params["output_types"], "params.output_types"))
    if (instruction := _optional_string(params, "instruction", "params")) is not None:
        p.instruction = instruction
    if (dtype := _optional_string(params, "output_dtype", "params")) is not None:
        p.output_dtype = dtype
    if params.get("is_query") is not None:
        if not isinstance(params["is_query"], bool):
            raise invalid_input("params.is_query must be true or false")
        p.is_query = params["is_query"]
    if params.get("dimensions") is not None:
        p.dimensions = positive_int(params["dimensions"], "params.dimensions")
    if params.get("options") is not None:
        p.options.CopyFrom(_struct(params["options"], "params.options"))
    return out


def positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise invalid_input(f"{where} must be a positive integer")
    return value


def score_request(model: str, value: Any) -> score_pb2.ScoreRequest:
    body = _body(value, frozenset({"query", "items", "instruction", "options"}))
    if body.get("query") is None:
        raise invalid_input("query is required")
    out = score_pb2.ScoreRequest(
        model=model, query=item(body["query"], "query"), items=items(body.get("items"))
    )
    if (instruction := _optional_string(body, "instruction", "body")) is not None:
        out.instruction = instruction
    if body.get("options") is not None:
        out.options.CopyFrom(_struct(body["options"], "options"))
    return out


def extract_request(model: str, value: Any) -> extract_pb2.ExtractRequest:
    body = _body(value, frozenset({"items", "params"}))
    params = _mapping(body.get("params") or {}, "params")
    _check_keys(params, EXTRACT_PARAM_KEYS, "params")
    out = extract_pb2.ExtractRequest(model=model, items=items(body.get("items")))
    p = out.params
    if params.get("labels") is not None:
        p.labels.extend(_strings(params["labels"], "params.labels"))
    if params.get("output_schema") is not None:
        p.output_schema.CopyFrom(_struct(params["output_schema"], "params.output_schema"))
    if (instruction := _optional_string(params, "instruction", "params")) is not None:
        p.instruction = instruction
    if params.get("options") is not None:
        p.options.CopyFrom(_struct(params["options"], "params.options"))
    return out
