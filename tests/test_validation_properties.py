"""Property-based checks (hypothesis, fixed seed, bounded) of the engine's request validation,
on every model of the built-in catalog with its real adapter family: any item from the wire and
any parameters a Struct can carry either become a call the engine can run, whose fields hold what
the model can do, or raise ``InvalidInput`` (INVALID_INPUT) with a message; never another
exception, which a transport would answer INTERNAL."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st
from sie_sdk.tensors import to_tensor
from sie_sdk.v1 import common_pb2
from sie_server.adapters.base import Encoder, Extractor, Scorer
from sie_server.catalog import BUILTIN_CATALOG_DIR, ModelSpec, load_catalog
from sie_server.catalog.spec import OUTPUT_TYPES
from sie_server.engine.registry import EngineConfig, ModelRegistry
from sie_server.errors import InvalidInput
from sie_server.grpc_api.convert import input_item, struct_to_dict
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.encode import EncodeParams, resolve_encode
from sie_server.tasks.extract import ExtractParams, resolve_extract
from sie_server.tasks.output_dtype import OUTPUT_DTYPES
from sie_server.tasks.score import ScoreParams, resolve_score, resolve_score_mode

from tests.fuzz_profile import hypothesis_settings

SETTINGS = hypothesis_settings(150)
LIMITS = RequestLimits(max_items=4, max_text_chars=64, max_labels=8)

CATALOG = load_catalog((BUILTIN_CATALOG_DIR,))
MODELS = sorted(CATALOG)


def _registry() -> ModelRegistry:
    from sie_server.device import resolve_placement
    from sie_server.engine.executor import ExecutorConfig

    return ModelRegistry(CATALOG, EngineConfig(ExecutorConfig(), resolve_placement("cpu", "auto")))


# What a Struct can hold: null, bool, number (a double), string, list, nested struct.
struct_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.integers(-(10**6), 10**6).map(float)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
# Keys a family reads, so that values of every kind reach the checks that read them.
KNOWN_KEYS = sorted(
    {
        "profile",
        "output_types",
        "output_dtype",
        "is_query",
        "instruction",
        "dimensions",
        "score_mode",
        "score_weights",
        "query_template",
        "doc_template",
        "threshold",
        "multi_label",
        "flat_ner",
        "max_width",
        "hypothesis_template",
        "pooling",
        "normalize",
        "prompt_name",
        "top_k",
    }
)
# Half of each draw is plain (no options, the default type and dtype), so that valid requests
# reach the checks on what passed as often as hostile ones reach the refusals.
options: st.SearchStrategy[dict[str, Any]] = st.just({}) | st.dictionaries(
    st.sampled_from(KNOWN_KEYS) | st.text(max_size=10), struct_values, max_size=4
)
dtypes = st.just("") | st.sampled_from([*OUTPUT_DTYPES, "", "float64", "int4", "x" * 300])
output_types: st.SearchStrategy[list[str]] = st.just([]) | st.lists(
    st.sampled_from([*OUTPUT_TYPES, "", "json", "dense "]), max_size=4
)


@st.composite
def wire_items(draw: st.DrawFn) -> common_pb2.Item:
    item = common_pb2.Item()
    if draw(st.integers(0, 4)) > 0:
        item.text = draw(st.text(max_size=80))
    if draw(st.integers(0, 4)) == 0:
        item.token_ids.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)))
    if draw(st.integers(0, 4)) == 0:
        rows, dims = draw(st.integers(0, 3)), draw(st.integers(0, 4))
        values = np.array(
            draw(
                st.lists(
                    st.floats(width=32, allow_nan=True, allow_infinity=True),
                    min_size=rows * dims,
                    max_size=rows * dims,
                )
            ),
            dtype=np.float32,
        ).reshape(rows, dims)
        dtype = draw(st.sampled_from([common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_INT8]))
        if dtype == common_pb2.DTYPE_INT8:
            item.multivector.CopyFrom(to_tensor(np.zeros((rows, dims), np.int8), dtype))
        else:
            item.multivector.CopyFrom(to_tensor(values, dtype))
        if draw(st.booleans()):  # a shape that lies about the bytes
            item.multivector.shape.append(draw(st.integers(0, 5)))
    if draw(st.integers(0, 9)) == 0:
        item.document.data = b"%PDF"
    return item


def _refused(exc: InvalidInput) -> None:
    assert exc.reason == "INVALID_INPUT"
    assert exc.message


def _struct_round_trip(values: dict[str, Any]) -> dict[str, Any]:
    """The options as a server receives them: through a protobuf Struct."""
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct_to_dict(struct)


def _items(spec: ModelSpec, wire: list[common_pb2.Item], *, token_ids: bool) -> list[Any]:
    return [
        input_item(item, index, spec.name, token_ids=token_ids) for index, item in enumerate(wire)
    ]


@pytest.mark.parametrize("model", MODELS)
@SETTINGS
@given(
    data=st.data(),
    wire=st.lists(wire_items(), min_size=1, max_size=5),
    types=output_types,
    dtype=dtypes,
    raw_options=options,
    dimensions=st.none() | st.integers(-5, 5000),
)
def test_encode_validation_gives_a_runnable_call_or_invalid_input(
    model: str,
    data: st.DataObject,
    wire: list[common_pb2.Item],
    types: list[str],
    dtype: str,
    raw_options: dict[str, Any],
    dimensions: int | None,
) -> None:
    spec = CATALOG[model]
    cls = _registry().adapter_type(model)
    if not issubclass(cls, Encoder) or "encode" not in spec.tasks:
        return
    try:
        call = resolve_encode(
            spec,
            _items(spec, wire, token_ids=True),
            EncodeParams(
                output_types=types,
                output_dtype=dtype or None,
                is_query=data.draw(st.none() | st.booleans()),
                instruction=data.draw(st.none() | st.text(max_size=10)),
                options=_struct_round_trip(raw_options),
                dimensions=dimensions,
            ),
            accepted_options=cls.encode_options,
            limits=LIMITS,
        )
    except InvalidInput as exc:
        _refused(exc)
        return
    # What passed is what the model can do.
    assert 0 < len(wire) <= LIMITS.max_items or len(wire) == 0
    assert call.settings.output_types
    assert set(call.settings.output_types) <= set(spec.outputs)
    assert list(call.settings.output_types) == [
        t for t in OUTPUT_TYPES if t in call.settings.output_types
    ]
    assert call.output_dtype in OUTPUT_DTYPES
    if call.dimensions is not None:
        assert 0 < call.dimensions <= (spec.outputs["dense"].dims or 0)
    for item in call.items:
        assert item.text is None or len(item.text) <= LIMITS.max_text_chars
        assert item.multivector is None or bool(np.isfinite(item.multivector).all())


@pytest.mark.parametrize("model", MODELS)
@SETTINGS
@given(
    query=wire_items() | st.none(),
    wire=st.lists(wire_items(), min_size=1, max_size=5),
    raw_options=options,
    instruction=st.none() | st.text(max_size=10),
)
def test_score_validation_gives_a_runnable_call_or_invalid_input(
    model: str,
    query: common_pb2.Item | None,
    wire: list[common_pb2.Item],
    raw_options: dict[str, Any],
    instruction: str | None,
) -> None:
    spec = CATALOG[model]
    cls = _registry().adapter_type(model)
    if not issubclass(cls, Scorer) or "score" not in spec.tasks:
        return
    try:
        call = resolve_score(
            spec,
            None if query is None else input_item(query, 0, spec.name, what="query"),
            _items(spec, wire, token_ids=False),
            ScoreParams(instruction=instruction, options=_struct_round_trip(raw_options)),
            accepted_options=cls.score_option_keys(),
            limits=LIMITS,
        )
        mode = resolve_score_mode(spec, call.settings.options) if issubclass(cls, Encoder) else None
    except InvalidInput as exc:
        _refused(exc)
        return
    assert len(call.items) <= LIMITS.max_items
    if mode is not None:
        assert mode.output_types
        assert set(mode.output_types) <= set(spec.outputs)
        assert all(w >= 0 for w in mode.weights.values())


@pytest.mark.parametrize("model", MODELS)
@SETTINGS
@given(
    wire=st.lists(wire_items(), min_size=1, max_size=5),
    labels=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=10)
    | st.lists(st.text(max_size=12), max_size=12),
    raw_options=options,
    schema=st.none() | st.none() | st.dictionaries(st.text(max_size=6), struct_values, max_size=2),
    instruction=st.none() | st.none() | st.text(max_size=10),
)
def test_extract_validation_gives_a_runnable_call_or_invalid_input(
    model: str,
    wire: list[common_pb2.Item],
    labels: list[str],
    raw_options: dict[str, Any],
    schema: dict[str, Any] | None,
    instruction: str | None,
) -> None:
    spec = CATALOG[model]
    cls = _registry().adapter_type(model)
    if not issubclass(cls, Extractor) or "extract" not in spec.tasks:
        return
    try:
        call = resolve_extract(
            spec,
            _items(spec, wire, token_ids=False),
            ExtractParams(
                labels=labels,
                output_schema=schema or None,
                instruction=instruction,
                options=_struct_round_trip(raw_options),
            ),
            support=cls.extract_support,
            accepted_options=cls.extract_options,
            limits=LIMITS,
        )
    except InvalidInput as exc:
        _refused(exc)
        return
    assert len(call.settings.labels) <= LIMITS.max_labels
    assert all(label.strip() for label in call.settings.labels)
    assert len(set(call.settings.labels)) == len(call.settings.labels)
    if call.settings.labels == ():
        assert not cls.extract_support.labels_required
