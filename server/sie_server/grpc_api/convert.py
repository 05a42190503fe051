"""Proto <-> engine conversions for the gRPC servicers. No business logic lives here."""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sie_sdk.tensors import DTYPE_BY_NAME, to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, models_pb2

from sie_server.adapters.base import ImageData, InputItem
from sie_server.catalog import ModelSpec
from sie_server.engine.encode import EncodeCall, EncodeOutcome, ItemResult, Timing, resolve_settings
from sie_server.engine.registry import ModelEntry, ModelState
from sie_server.errors import InvalidInput


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value) if value.fields else {}


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def encode_call(
    request: encode_pb2.EncodeRequest, spec: ModelSpec, max_items: int, deadline: float | None
) -> EncodeCall:
    if not request.items:
        raise InvalidInput("items must not be empty", model=spec.name)
    if len(request.items) > max_items:
        raise InvalidInput(
            f"{len(request.items)} items exceed the limit of {max_items} per request",
            model=spec.name,
        )
    items: list[InputItem] = []
    for index, item in enumerate(request.items):
        if item.HasField("document"):
            raise InvalidInput(
                f"item {index}: model {spec.name} does not parse documents", model=spec.name
            )
        items.append(
            InputItem(
                text=item.text if item.HasField("text") else None,
                images=tuple(ImageData(image.data, image.format) for image in item.images),
            )
        )
    params = request.params
    settings, dtype = resolve_settings(
        spec,
        output_types=list(params.output_types),
        instruction=params.instruction if params.HasField("instruction") else None,
        is_query=params.is_query if params.HasField("is_query") else None,
        options=struct_to_dict(params.options),
        output_dtype=params.output_dtype,
    )
    return EncodeCall(items=items, settings=settings, output_dtype=dtype, deadline=deadline)


def timing_pb(timing: Timing) -> common_pb2.Timing:
    return common_pb2.Timing(
        total_ms=timing.total_ms,
        queue_ms=timing.queue_ms,
        tokenization_ms=timing.tokenization_ms,
        inference_ms=timing.inference_ms,
        postprocessing_ms=timing.postprocessing_ms,
    )


def encode_response(
    model: str, request: encode_pb2.EncodeRequest, outcome: EncodeOutcome, spec: ModelSpec
) -> encode_pb2.EncodeResponse:
    dtype = DTYPE_BY_NAME[outcome.output_dtype]
    items = [
        _encode_result(item.id, result, dtype, spec)
        for item, result in zip(request.items, outcome.items, strict=True)
    ]
    return encode_pb2.EncodeResponse(model=model, items=items, timing=timing_pb(outcome.timing))


def _encode_result(
    item_id: str, result: ItemResult, dtype: common_pb2.Dtype.ValueType, spec: ModelSpec
) -> encode_pb2.EncodeResult:
    out = encode_pb2.EncodeResult(
        id=item_id, num_tokens=result.num_tokens, truncated=result.truncated
    )
    if result.dense is not None:
        out.dense.dims = spec.outputs["dense"].dims
        out.dense.values.CopyFrom(to_tensor(result.dense, dtype))
    if result.sparse is not None:
        out.sparse.dims = spec.outputs["sparse"].dims
        out.sparse.indices.CopyFrom(to_tensor(result.sparse.indices, common_pb2.DTYPE_INT32))
        out.sparse.values.CopyFrom(
            to_tensor(result.sparse.values, DTYPE_BY_NAME[result.sparse.dtype])
        )
    if result.multivector is not None:
        out.multivector.token_dims = spec.outputs["multivector"].dims
        out.multivector.num_tokens = int(result.multivector.shape[0])
        out.multivector.values.CopyFrom(to_tensor(result.multivector, dtype))
    return out


_STATE = {
    ModelState.AVAILABLE: models_pb2.MODEL_STATE_AVAILABLE,
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.LOADED: models_pb2.MODEL_STATE_LOADED,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
}


def model_info(entry: ModelEntry, device: str) -> models_pb2.ModelInfo:
    spec = entry.spec
    loaded = entry.state is ModelState.LOADED
    return models_pb2.ModelInfo(
        name=spec.name,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        dims={kind: out.dims for kind, out in spec.outputs.items()},
        loaded=loaded,
        max_sequence_length=spec.max_sequence_length,
        profiles={
            name: models_pb2.ProfileInfo(
                is_default=name == spec.default_profile,
                output_types=list(profile.output_types),
                output_similarity={t: spec.outputs[t].similarity for t in profile.output_types},
            )
            for name, profile in spec.profiles.items()
        },
        state=_STATE[entry.state],
        device=device if loaded else "",
        error=entry.error or "",
    )
