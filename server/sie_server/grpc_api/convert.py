"""Proto <-> engine conversions every service shares: items, options, deadlines, timing, ids.
No validation beyond decoding lives here; the task modules validate. Two fields no engine path
reads are refused here: documents (no document parser is served) and token ids outside Encode
(the adapters of Encode decode them)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2
from sie_sdk.tensors import TensorError, from_tensor
from sie_sdk.v1 import common_pb2

from sie_server.domain import ImageData, InputItem, Timing
from sie_server.errors import InvalidInput

Context = grpc.aio.ServicerContext[Any, Any]


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value) if value.fields else {}


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def deadline_of(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def item_id(item: common_pb2.Item, index: int) -> str:
    """The client's id, or ``item-<index>`` when it gave none."""
    return item.id or f"item-{index}"


def input_item(
    item: common_pb2.Item,
    index: int,
    model: str,
    *,
    what: str = "item",
    token_ids: bool = False,
) -> InputItem:
    """``token_ids``: the RPC accepts token ids (Encode); elsewhere they are InvalidInput."""
    if item.HasField("document"):
        raise InvalidInput(f"{what} {index}: model {model} does not parse documents", model=model)
    if item.token_ids and not token_ids:
        raise InvalidInput(f"{what} {index}: token_ids are accepted by Encode only", model=model)
    multivector = None
    if item.HasField("multivector"):
        try:
            array = from_tensor(item.multivector)
        except TensorError as exc:
            raise InvalidInput(f"{what} {index}: bad multivector: {exc}", model=model) from None
        if array.dtype.kind != "f":
            raise InvalidInput(
                f"{what} {index}: a multivector must be float32 or float16", model=model
            )
        multivector = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(multivector).all():
            raise InvalidInput(
                f"{what} {index}: the multivector holds NaN or infinite values", model=model
            )
    return InputItem(
        text=item.text if item.HasField("text") else None,
        images=tuple(ImageData(image.data, image.format) for image in item.images),
        multivector=multivector,
        token_ids=tuple(item.token_ids),
    )


def input_items(
    items: Sequence[common_pb2.Item], model: str, *, token_ids: bool = False
) -> list[InputItem]:
    return [input_item(item, index, model, token_ids=token_ids) for index, item in enumerate(items)]


def timing_pb(timing: Timing) -> common_pb2.Timing:
    return common_pb2.Timing(
        total_ms=timing.total_ms,
        queue_ms=timing.queue_ms,
        tokenization_ms=timing.tokenization_ms,
        inference_ms=timing.inference_ms,
        postprocessing_ms=timing.postprocessing_ms,
    )
