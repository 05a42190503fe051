"""What a vector costs on the wire: float32 vectors within 5% of their 4·dim bytes on gRPC, and on
msgpack from 768 dims up. At 384 dims msgpack misses by its fixed per-item keys (the documented
``dense: {dims, dtype, values}`` and the msgpack-numpy map), which this test bounds too."""

from __future__ import annotations

import numpy as np
import pytest
from sie_sdk.convert.from_proto import encode_response
from sie_sdk.tensors import DTYPE_BY_NAME, to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2
from sie_sdk.wire import pack_msgpack

ITEMS = 32
#: Bytes per result besides the vector on msgpack: the documented keys, the msgpack-numpy map,
#: id, num_tokens and truncated.
MSGPACK_ITEM_OVERHEAD = 124


def response(dims: int) -> encode_pb2.EncodeResponse:
    rng = np.random.default_rng(dims)
    items = []
    for index in range(ITEMS):
        result = encode_pb2.EncodeResult(id=f"item-{index}", num_tokens=85)
        result.dense.dims = dims
        values = rng.standard_normal(dims).astype(np.float32)
        result.dense.values.CopyFrom(to_tensor(values, DTYPE_BY_NAME["float32"]))
        items.append(result)
    return encode_pb2.EncodeResponse(
        model="sentence-transformers/all-MiniLM-L6-v2",
        items=items,
        timing=common_pb2.Timing(total_ms=9.5, queue_ms=1.25, inference_ms=7.5),
    )


@pytest.mark.parametrize("dims", [384, 768, 1024])
def test_grpc_vectors_cost_within_five_percent(dims: int) -> None:
    size = len(response(dims).SerializeToString())
    assert size <= 1.05 * ITEMS * 4 * dims


@pytest.mark.parametrize("dims", [384, 768, 1024])
def test_msgpack_vectors_cost_their_bytes_plus_fixed_keys(dims: int) -> None:
    size = len(pack_msgpack(encode_response(response(dims))))
    assert size <= ITEMS * (4 * dims + MSGPACK_ITEM_OVERHEAD) + 300  # + model, timing
    if dims >= 768:
        assert size <= 1.05 * ITEMS * 4 * dims
