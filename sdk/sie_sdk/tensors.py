"""``sie.v1.Tensor`` <-> numpy, without copying element by element.

A Tensor is row-major little-endian bytes plus a dtype and a shape. ``DTYPE_BINARY`` holds bits
packed eight to a byte (``numpy.packbits``), so its last dimension counts bytes.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from sie_sdk.v1 import common_pb2

DType: TypeAlias = common_pb2.Dtype.ValueType

DTYPE_TO_NUMPY: dict[DType, np.dtype[np.generic]] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_INT8: np.dtype("i1"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
    common_pb2.DTYPE_BINARY: np.dtype("u1"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
}

#: The names the HTTP API and SDK use for output dtypes.
DTYPE_NAMES: dict[DType, str] = {
    common_pb2.DTYPE_FLOAT32: "float32",
    common_pb2.DTYPE_FLOAT16: "float16",
    common_pb2.DTYPE_INT8: "int8",
    common_pb2.DTYPE_UINT8: "uint8",
    common_pb2.DTYPE_BINARY: "binary",
    common_pb2.DTYPE_INT32: "int32",
}
DTYPE_BY_NAME: dict[str, DType] = {name: value for value, name in DTYPE_NAMES.items()}


class TensorError(ValueError):
    """A Tensor message whose bytes do not match its dtype and shape."""


def to_tensor(array: npt.NDArray[np.generic], dtype: DType) -> common_pb2.Tensor:
    """Wrap an array as a Tensor of ``dtype`` (the array is cast only if its dtype differs)."""
    want = DTYPE_TO_NUMPY[dtype]
    data = np.ascontiguousarray(array, dtype=want)
    return common_pb2.Tensor(dtype=dtype, shape=data.shape, data=data.tobytes())


def from_tensor(tensor: common_pb2.Tensor) -> npt.NDArray[np.generic]:
    """A read-only numpy view of the Tensor's bytes, shaped."""
    try:
        dt = DTYPE_TO_NUMPY[tensor.dtype]
    except KeyError:
        raise TensorError(f"unknown tensor dtype {tensor.dtype}") from None
    shape = tuple(int(d) for d in tensor.shape)
    expected = math.prod(shape) * dt.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"tensor of shape {shape} and {dt} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dt).reshape(shape)
