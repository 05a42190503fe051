"""sie_sdk.wire: msgpack-numpy maps built from proto tensors decode with msgpack-numpy's own hook
(and ours) into the same arrays; JSON lists and base64; negotiation; malformed bodies."""

from __future__ import annotations

import base64
import json

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from sie_sdk.tensors import DTYPE_BY_NAME, to_tensor
from sie_sdk.wire import (
    WireError,
    dump_json,
    is_msgpack,
    pack_msgpack,
    packed_tensor,
    unpack_msgpack,
    wants_json,
)

ARRAYS = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "float16": np.linspace(-1, 1, 6, dtype=np.float16),
    "int8": np.array([-128, 0, 127], dtype=np.int8),
    "binary": np.packbits(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=np.uint8)),
    "int32": np.array([[1, 2], [3, 2**31 - 1]], dtype=np.int32),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_packed_tensors_decode_with_msgpack_numpy(name: str) -> None:
    array = ARRAYS[name]
    body = pack_msgpack({"values": packed_tensor(to_tensor(array, DTYPE_BY_NAME[name]))})
    theirs = msgpack.unpackb(body, object_hook=msgpack_numpy.decode, raw=False)["values"]
    ours = unpack_msgpack(body)["values"]
    for decoded in (theirs, ours):
        assert isinstance(decoded, np.ndarray)
        assert decoded.dtype == array.dtype
        assert decoded.shape == array.shape
        assert decoded.tobytes() == array.tobytes()


def test_the_map_layout_is_msgpack_numpys() -> None:
    array = ARRAYS["float32"]
    ours = msgpack.unpackb(pack_msgpack(packed_tensor(to_tensor(array, 1))), raw=False)
    theirs = msgpack.unpackb(msgpack.packb(array, default=msgpack_numpy.encode), raw=False)
    assert ours == theirs
    assert set(ours) == {b"nd", b"type", b"kind", b"shape", b"data"}


def test_numpy_request_values_round_trip_and_arrays_are_views() -> None:
    value = {"q": ARRAYS["float32"], "n": np.int64(3), "t": (1, 2)}
    decoded = unpack_msgpack(pack_msgpack(value))
    assert np.array_equal(decoded["q"], value["q"])
    assert not decoded["q"].flags.writeable  # a view of the received bytes, not a copy
    assert decoded["n"] == 3
    assert decoded["t"] == [1, 2]


def test_json_writes_lists_and_base64() -> None:
    packed = packed_tensor(to_tensor(ARRAYS["int32"], DTYPE_BY_NAME["int32"]))
    out = json.loads(dump_json({"a": packed, "b": np.float32(0.5), "c": b"\x00\xff"}))
    assert out == {
        "a": [[1, 2], [3, 2**31 - 1]],
        "b": 0.5,
        "c": base64.b64encode(b"\x00\xff").decode(),
    }
    with pytest.raises(ValueError, match="JSON compliant"):
        dump_json({"x": float("nan")})


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",
        pack_msgpack({b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [3], b"data": b"\x00"}),
        pack_msgpack({b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": b"x"}),
        pack_msgpack({b"nd": True, b"shape": [1]}),
    ],
)
def test_malformed_msgpack_is_a_wire_error(body: bytes) -> None:
    with pytest.raises(WireError):
        unpack_msgpack(body)


@pytest.mark.parametrize(
    ("shape", "data", "says"),
    [
        ([-2, -2], b"\x00" * 16, "negative"),  # the product alone matches 16 bytes
        ([2**62, 4], b"", "does not match"),  # 2**64 elements: int64 would wrap to 0
    ],
)
def test_a_shape_that_only_multiplies_right_is_refused_by_name(
    shape: list[int], data: bytes, says: str
) -> None:
    body = pack_msgpack({b"nd": True, b"type": "<f4", b"kind": b"", b"shape": shape, b"data": data})
    with pytest.raises(WireError, match=says):
        unpack_msgpack(body)


@pytest.mark.parametrize(
    ("accept", "json_wanted"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("application/msgpack", False),
        ("application/x-msgpack", False),
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/json, */*;q=0.1", True),
        ("application/msgpack, application/json", False),
        ("application/msgpack;q=0.5, application/json", True),
        ("application/json;q=0, */*", False),
        ("text/html", False),
    ],
)
def test_accept_negotiation(accept: str | None, json_wanted: bool) -> None:
    assert wants_json(accept) is json_wanted


def test_request_content_types() -> None:
    assert is_msgpack("application/msgpack")
    assert is_msgpack("Application/X-Msgpack; charset=binary")
    assert not is_msgpack("application/json")
    assert not is_msgpack(None)
