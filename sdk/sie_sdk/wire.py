"""HTTP wire codecs shared by the bridge and the SDK's HTTP transport: msgpack-numpy and JSON.

msgpack bodies carry arrays in the msgpack-numpy map layout that the original SIE SDK decodes
(``msgpack_numpy.decode``): a map whose keys are msgpack **bin** ``nd`` (true), ``type`` (the
numpy dtype string, e.g. ``<f4``), ``kind`` (empty bin), ``shape`` (ints) and ``data`` (bin,
exactly prod(shape) x itemsize bytes, row-major). ``packed_tensor`` builds that map straight
from a ``sie.v1.Tensor``'s bytes, so no element is touched in Python; ``unpack_msgpack`` turns such
maps back into read-only numpy views of the received buffer (no copy).

JSON bodies carry arrays as (nested) lists and ``bytes`` as base64 strings.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack
import numpy as np

from sie_sdk.tensors import DTYPE_TO_NUMPY, TensorError
from sie_sdk.v1 import common_pb2

MSGPACK = "application/msgpack"
JSON = "application/json"
#: Media types clients use for msgpack besides ours.
MSGPACK_ALIASES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})


class WireError(ValueError):
    """A body that does not decode (malformed msgpack or JSON, a bad array map)."""


# ---- msgpack --------------------------------------------------------------------------------
def packed_tensor(tensor: common_pb2.Tensor) -> dict[bytes, Any]:
    """The msgpack-numpy map of a proto Tensor, sharing its bytes."""
    try:
        dtype = DTYPE_TO_NUMPY[tensor.dtype]
    except KeyError:
        raise TensorError(f"unknown tensor dtype {tensor.dtype}") from None
    shape = [int(d) for d in tensor.shape]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(f"tensor of shape {shape} needs {expected} bytes, has {len(tensor.data)}")
    return _nd_map(dtype.str, shape, tensor.data)


def _nd_map(dtype: str, shape: list[int], data: bytes | memoryview) -> dict[bytes, Any]:
    return {b"nd": True, b"type": dtype, b"kind": b"", b"shape": shape, b"data": data}


def _pack_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OV":
            raise TypeError(f"cannot send arrays of dtype {value.dtype}")
        array = np.ascontiguousarray(value)
        return _nd_map(array.dtype.str, list(array.shape), array.tobytes())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot pack {type(value).__name__}")


def pack_msgpack(value: Any) -> bytes:
    """msgpack with ``use_bin_type``; numpy arrays as msgpack-numpy maps."""
    packed: bytes = msgpack.packb(value, default=_pack_default, use_bin_type=True)
    return packed


def _unpack_hook(value: dict[Any, Any]) -> Any:
    if value.get(b"nd") is not True:
        return value
    try:
        kind = value.get(b"kind", b"")
        if kind not in (b"", ""):
            raise WireError("structured or object arrays are not accepted")
        raw_type = value[b"type"]
        dtype = np.dtype(raw_type.decode() if isinstance(raw_type, bytes) else raw_type)
        shape = tuple(int(d) for d in value[b"shape"])
        data = value[b"data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad msgpack-numpy array: {exc}") from None
    if dtype.kind in "OV":
        raise WireError("structured or object arrays are not accepted")
    if any(d < 0 for d in shape):
        raise WireError(f"array of shape {shape}: a dimension is negative")
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise WireError(f"array of shape {shape} and {dtype} does not match its {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def unpack_msgpack(body: bytes) -> Any:
    """Decode msgpack; msgpack-numpy maps become read-only numpy views of ``body``."""
    try:
        return msgpack.unpackb(body, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(f"malformed msgpack body: {exc}") from None


# ---- JSON -----------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def unpacked(value: Any) -> Any:
    """``value`` with every packed tensor map (``packed_tensor``) turned into a read-only numpy
    view of its bytes; everything else passes through."""
    if isinstance(value, dict):
        if value.get(b"nd") is True:
            dtype = np.dtype(value[b"type"])
            return np.frombuffer(value[b"data"], dtype=dtype).reshape(value[b"shape"])
        return {key: unpacked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unpacked(item) for item in value]
    return value


def dump_json(value: Any) -> bytes:
    """JSON: arrays as lists, bytes as base64; non-finite floats refused (JSON has none)."""
    return json.dumps(
        unpacked(value), default=_json_default, allow_nan=False, separators=(",", ":")
    ).encode()


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed JSON body: {exc}") from None


# ---- negotiation ----------------------------------------------------------------------------
def is_msgpack(content_type: str | None) -> bool:
    """A request body is msgpack when its Content-Type says so, else JSON."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() in MSGPACK_ALIASES


def wants_json(accept: str | None) -> bool:
    """Responses are msgpack unless ``Accept`` prefers JSON (absent, msgpack or ``*/*``: msgpack).

    The media type with the highest q wins; on a tie msgpack does."""
    if not accept:
        return False
    best_msgpack = best_json = -1.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if media in MSGPACK_ALIASES or media in ("*/*", "application/*"):
            best_msgpack = max(best_msgpack, q)
        elif media == JSON:
            best_json = max(best_json, q)
    return best_json > 0 and best_json > best_msgpack
