"""``sie.v1.EncodeService``: the servicer and its converters.

The response echoes the model name the client sent (a ``<name>:<profile>`` variant too); the
engine runs under the catalog name. Items may carry token ids (decoded by the family).
``EncodeStream`` runs each of its messages through the same ``encode`` (see ``encode_stream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from sie_sdk.tensors import DTYPE_BY_NAME, to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

from sie_server.adapters.base import Encoder
from sie_server.catalog import ModelSpec
from sie_server.engine.registry import ModelRegistry
from sie_server.grpc_api.convert import (
    Context,
    deadline_of,
    input_items,
    item_id,
    struct_to_dict,
    timing_pb,
)
from sie_server.grpc_api.encode_stream import StreamMetrics, encode_stream
from sie_server.grpc_api.errors import translate_errors
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.encode import EncodedItem, EncodeParams, resolve_encode


class EncodeServicer(encode_pb2_grpc.EncodeServiceServicer):
    def __init__(self, registry: ModelRegistry, limits: RequestLimits) -> None:
        self.registry = registry
        self.limits = limits

    @translate_errors
    async def Encode(
        self, request: encode_pb2.EncodeRequest, context: Context
    ) -> encode_pb2.EncodeResponse:
        return await self.encode(request, deadline_of(context))

    async def EncodeStream(
        self, request_iterator: AsyncIterator[encode_pb2.EncodeStreamRequest], context: Context
    ) -> AsyncIterator[encode_pb2.EncodeStreamResponse]:
        # An async generator function itself: grpc tells stream handlers apart by that.
        # Headers at once: they tell the client the stream was accepted (an API key refused
        # ends it before this), and a grpc aio client waits for them before its second message
        # (sie_sdk's gRPC transport), since one still writing when a refusal comes reports
        # INTERNAL instead of it (grpc/grpc#36066).
        await context.send_initial_metadata(())
        responses = encode_stream(
            request_iterator,
            lambda request: self.encode(request, deadline_of(context), bulk=True),
            StreamMetrics(self.registry),
        )
        async with aclosing(responses):
            async for response in responses:
                yield response

    async def encode(
        self, request: encode_pb2.EncodeRequest, deadline: float | None, *, bulk: bool = False
    ) -> encode_pb2.EncodeResponse:
        """One request, validated and run through the engine: what ``Encode`` and each message
        of ``EncodeStream`` (``bulk``: it yields to interactive requests) do. Domain errors
        propagate as ``SIEServerError``."""
        ref, cls = self.registry.require_task(request.model, "encode")
        assert issubclass(cls, Encoder)
        spec = ref.spec
        params = request.params
        call = resolve_encode(
            spec,
            input_items(request.items, spec.name, token_ids=True),
            EncodeParams(
                output_types=list(params.output_types),
                output_dtype=params.output_dtype or None,
                is_query=params.is_query if params.HasField("is_query") else None,
                instruction=params.instruction if params.HasField("instruction") else None,
                options=ref.options(struct_to_dict(params.options)),
                dimensions=params.dimensions if params.HasField("dimensions") else None,
            ),
            accepted_options=cls.encode_options,
            limits=self.limits,
            deadline=deadline,
        )
        outcome = await self.registry.encode(spec.name, call, bulk=bulk)
        dtype = DTYPE_BY_NAME[call.output_dtype]
        return encode_pb2.EncodeResponse(
            model=request.model,
            items=[
                encode_result(item_id(item, index), result, dtype, spec, call.dense_dims)
                for index, (item, result) in enumerate(
                    zip(request.items, outcome.result, strict=True)
                )
            ],
            timing=timing_pb(outcome.timing),
        )


def encode_result(
    result_id: str,
    result: EncodedItem,
    dtype: common_pb2.Dtype.ValueType,
    spec: ModelSpec,
    dimensions: int | None = None,
) -> encode_pb2.EncodeResult:
    """One item's result; ``dimensions``: the dense dims kept (None: the model's)."""
    out = encode_pb2.EncodeResult(
        id=result_id, num_tokens=result.num_tokens, truncated=result.truncated
    )
    if result.dense is not None:
        out.dense.dims = dimensions or spec.outputs["dense"].dims or 0
        out.dense.values.CopyFrom(to_tensor(result.dense, dtype))
    if result.sparse is not None:
        out.sparse.dims = spec.outputs["sparse"].dims or 0
        out.sparse.indices.CopyFrom(to_tensor(result.sparse.indices, common_pb2.DTYPE_INT32))
        out.sparse.values.CopyFrom(
            to_tensor(result.sparse.values, DTYPE_BY_NAME[result.sparse.dtype])
        )
    if result.multivector is not None:
        out.multivector.token_dims = spec.outputs["multivector"].dims or 0
        out.multivector.num_tokens = int(result.multivector.shape[0])
        out.multivector.values.CopyFrom(to_tensor(result.multivector, dtype))
    return out
