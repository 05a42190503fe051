"""Property-based checks (hypothesis, fixed seed, bounded) of the request converters the bridge
and the SDK share: any JSON-shaped value, and any value of the right shape with hostile contents,
becomes a protobuf request or a ``WireError`` naming the field: never another exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sie_sdk.convert import to_proto
from sie_sdk.wire import WireError, unpack_msgpack

from tests.fuzz_profile import hypothesis_settings

SETTINGS = hypothesis_settings(300)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary(max_size=64),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
items = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "text": st.text() | json_values,
            "images": json_values,
            "multivector": json_values,
            "token_ids": st.lists(st.integers()) | json_values,
            "metadata": json_values,
        },
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"items": items},
    optional={
        "params": st.fixed_dictionaries(
            {},
            optional={
                "output_types": json_values,
                "output_dtype": json_values,
                "options": json_values,
                "labels": st.lists(st.text(), max_size=50) | json_values,
                "dimensions": json_values,
            },
        ),
        "query": json_values,
    },
)


def converts_or_refuses(convert: Any, value: Any) -> None:
    try:
        message = convert("m", value)
    except WireError as exc:
        refusal = str(exc)
    else:
        assert message.model == "m"
        return
    assert refusal, "a refusal names what is wrong"


@SETTINGS
@given(json_values | bodies)
def test_encode_bodies_convert_or_are_refused(value: Any) -> None:
    converts_or_refuses(to_proto.encode_request, value)


@SETTINGS
@given(json_values | bodies)
def test_extract_bodies_convert_or_are_refused(value: Any) -> None:
    converts_or_refuses(to_proto.extract_request, value)


@SETTINGS
@given(json_values | bodies.map(lambda b: {**b, "query": (b.get("items") or [{}])[0]}))
def test_score_bodies_convert_or_are_refused(value: Any) -> None:
    converts_or_refuses(to_proto.score_request, value)


@SETTINGS
@given(st.binary(max_size=256))
def test_any_bytes_decode_as_msgpack_or_are_refused(body: bytes) -> None:
    try:
        unpack_msgpack(body)
    except WireError as exc:
        refusal = str(exc)
    else:
        return
    assert "msgpack" in refusal


@pytest.mark.parametrize(
    "multivector",
    [[[10**400]], [[float("nan")]], [[float("inf"), 1.0]], [[1e39]], [[True]], [[None]], [["1"]]],
)
def test_hostile_multivectors_are_refused(multivector: Any) -> None:
    # Found by the properties above: these once raised OverflowError or passed NaN through.
    with pytest.raises(WireError, match="multivector"):
        to_proto.score_request(
            "m", {"query": {"multivector": multivector}, "items": [{"text": "a"}]}
        )


def test_options_past_json_numbers_are_refused() -> None:
    with pytest.raises(WireError, match=r"params\.options"):
        to_proto.encode_request(
            "m", {"items": [{"text": "x"}], "params": {"options": {"a": 10**400}}}
        )


def test_the_server_refuses_a_non_finite_query_multivector_over_grpc() -> None:
    import numpy as np
    from sie_sdk.tensors import to_tensor
    from sie_sdk.v1 import common_pb2
    from sie_server.errors import InvalidInput
    from sie_server.grpc_api.convert import input_item

    values = np.array([[1.0, float("nan")]], dtype=np.float32)
    item = common_pb2.Item(multivector=to_tensor(values, common_pb2.DTYPE_FLOAT32))
    with pytest.raises(InvalidInput, match="query 0: the multivector holds NaN"):
        input_item(item, 0, "m", what="query")


@pytest.mark.parametrize("images", [1, 2.5, True, {"data": "x"}])
def test_images_that_are_not_a_list_are_refused(images: Any) -> None:
    # Found by the properties above: an integer once raised TypeError (a 500 on the bridge).
    with pytest.raises(WireError, match=r"items\[0\]\.images must be a list"):
        to_proto.encode_request("m", {"items": [{"images": images}]})
