"""Request options: typed parameters sent inside ``options``, templates, unknown keys, profiles,
score modes. Units on the task modules, then the same rules end to end over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, score_pb2, score_pb2_grpc
from sie_server.catalog.spec import parse_spec
from sie_server.domain import InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks.encode import TEMPLATE_KEYS, EncodeParams, resolve_encode
from sie_server.tasks.extract import ExtractParams, ExtractSupport, resolve_extract
from sie_server.tasks.score import ScoreParams, resolve_score, resolve_score_mode

from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import dense

SPEC = parse_spec(
    {
        "name": "m",
        "adapter": "dense",
        "hf_id": "x/y",
        "max_sequence_length": 16,
        "outputs": {"dense": {"dims": 4}},
        "profiles": {
            "default": {"output_types": ["dense"]},
            "retrieval": {
                "output_types": ["dense"],
                "options": {"query_template": "query: {text}", "is_query": True},
            },
            "broken": {"options": {"query_template": "query: {txt}"}},
            "scoring": {"options": {"score_mode": "dense", "query_template": "q: {text}"}},
        },
    }
)
M3 = parse_spec(
    {
        "name": "m3",
        "adapter": "bge_m3",
        "hf_id": "x/m3",
        "max_sequence_length": 16,
        "outputs": {
            "dense": {"dims": 4},
            "sparse": {"dims": 10, "similarity": "dot"},
            "multivector": {"dims": 4, "similarity": "maxsim"},
        },
    }
)
ITEMS = [InputItem(text="a")]


def encode(params: EncodeParams, accepted: frozenset[str] = TEMPLATE_KEYS) -> Any:
    return resolve_encode(SPEC, ITEMS, params, accepted_options=accepted, limits=4)


# ---- typed parameters inside options ----------------------------------------------------------


def test_typed_parameters_inside_options_work_like_the_fields() -> None:
    from_options = encode(
        EncodeParams(
            options={
                "is_query": True,
                "output_types": ["dense"],
                "output_dtype": "int8",
                "instruction": "Find:",
            }
        )
    )
    from_fields = encode(
        EncodeParams(
            output_types=["dense"], output_dtype="int8", is_query=True, instruction="Find:"
        )
    )
    assert from_options == from_fields
    assert from_options.settings.is_query
    assert from_options.settings.instruction == "Find:"
    assert from_options.output_dtype == "int8"
    assert from_options.settings.options == {}, "typed keys do not reach the adapter"


def test_a_set_field_wins_over_options_which_win_over_the_profile() -> None:
    call = encode(EncodeParams(is_query=False, options={"profile": "retrieval"}))
    assert not call.settings.is_query, "the field beats the profile's is_query"
    call = encode(EncodeParams(options={"profile": "retrieval", "is_query": False}))
    assert not call.settings.is_query, "the request's option beats the profile's"
    call = encode(EncodeParams(options={"profile": "retrieval"}))
    assert call.settings.is_query
    assert call.settings.options == {"query_template": "query: {text}"}
    call = encode(EncodeParams(output_dtype="float16", options={"output_dtype": "binary"}))
    assert call.output_dtype == "float16"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"is_query": "yes"}, "option 'is_query' must be true or false"),
        ({"output_types": "dense"}, "option 'output_types' must be a list of strings"),
        ({"output_dtype": 8}, "option 'output_dtype' must be a string"),
        ({"output_dtype": "int4"}, "unknown output_dtype 'int4'"),
        ({"instruction": ["x"]}, "option 'instruction' must be a string"),
        ({"colour": "red"}, "unknown option 'colour' for model m"),
        ({"query_template": "q: {txt}"}, "option 'query_template' uses placeholder {txt}"),
        ({"document_template": "d: {text"}, "option 'document_template' is not a valid template"),
        (
            {"instruction_template": "{0} {text}"},
            "option 'instruction_template' uses placeholder {0}",
        ),
        ({"query_template": "{text.upper}"}, "uses placeholder {text.upper}"),
        ({"profile": "nope"}, "unknown profile 'nope'"),
        ({"profile": "broken"}, "option 'query_template' uses placeholder {txt}"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=None) as caught:
        encode(EncodeParams(options=options))
    assert fragment in caught.value.message
    assert caught.value.model == "m"


def test_a_profile_serves_every_task_each_reading_its_own_keys() -> None:
    call = encode(EncodeParams(options={"profile": "scoring"}))
    assert call.settings.options == {"query_template": "q: {text}"}, "score_mode is not encode's"
    score = resolve_score(
        SPEC,
        InputItem(text="q"),
        ITEMS,
        ScoreParams(options={"profile": "scoring"}),
        accepted_options={"score_mode", *TEMPLATE_KEYS},
        limits=4,
    )
    assert score.settings.options == {"score_mode": "dense", "query_template": "q: {text}"}
    with pytest.raises(InvalidInput, match="unknown option 'score_mode'"):
        encode(EncodeParams(options={"score_mode": "dense"}))  # a request's keys are strict


def test_options_a_family_does_not_read_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown option 'query_template'"):
        encode(EncodeParams(options={"query_template": "{text}"}), accepted=frozenset())


def test_score_and_extract_refuse_unknown_options_and_take_instruction_in_options() -> None:
    query = InputItem(text="q")
    call = resolve_score(
        SPEC,
        query,
        ITEMS,
        ScoreParams(options={"instruction": "Why:"}),
        accepted_options=(),
        limits=4,
    )
    assert call.settings.instruction == "Why:"
    with pytest.raises(InvalidInput, match="unknown option 'threshold'"):
        resolve_score(
            SPEC,
            query,
            ITEMS,
            ScoreParams(options={"threshold": 1}),
            accepted_options=(),
            limits=4,
        )
    support = ExtractSupport()
    extract = resolve_extract(
        SPEC,
        ITEMS,
        ExtractParams(labels=["a", "b", "a"], options={"threshold": 0.2}),
        support=support,
        accepted_options={"threshold"},
        limits=4,
    )
    assert extract.settings.labels == ("a", "b")
    assert extract.settings.options == {"threshold": 0.2}
    with pytest.raises(InvalidInput, match="labels are required"):
        resolve_extract(
            SPEC, ITEMS, ExtractParams(), support=support, accepted_options=(), limits=4
        )
    with pytest.raises(InvalidInput, match="cannot fill an output_schema"):
        resolve_extract(
            SPEC,
            ITEMS,
            ExtractParams(labels=["a"], output_schema={"type": "object"}),
            support=support,
            accepted_options=(),
            limits=4,
        )
    with pytest.raises(InvalidInput, match="label 1 is empty"):
        resolve_extract(
            SPEC,
            ITEMS,
            ExtractParams(labels=["a", " "]),
            support=support,
            accepted_options=(),
            limits=4,
        )


# ---- score modes ------------------------------------------------------------------------------


def test_score_modes_of_an_embedding_model() -> None:
    assert resolve_score_mode(SPEC, {}).name == "dense"
    with pytest.raises(InvalidInput, match="'score_mode' must be one of dense"):
        resolve_score_mode(SPEC, {"score_mode": "hybrid"})
    assert resolve_score_mode(M3, {}).output_types == ("dense",)
    hybrid = resolve_score_mode(M3, {"score_mode": "hybrid"})
    assert dict(hybrid.weights) == {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}
    assert hybrid.output_types == ("dense", "sparse", "multivector")
    custom = resolve_score_mode(M3, {"score_mode": "hybrid", "score_weights": {"sparse": 0}})
    assert dict(custom.weights) == {"dense": 0.4, "sparse": 0.0, "colbert": 0.4}
    assert custom.output_types == ("dense", "multivector"), "a zero weight costs no output"
    assert resolve_score_mode(M3, {"score_mode": "colbert"}).output_types == ("multivector",)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"score_mode": "cosine"}, "'score_mode' must be one of colbert, dense, hybrid, sparse"),
        ({"score_mode": "dense", "score_weights": {"dense": 1}}, "applies to score_mode 'hybrid'"),
        ({"score_mode": "hybrid", "score_weights": {"bm25": 1}}, "'score_weights' has 'bm25'"),
        ({"score_mode": "hybrid", "score_weights": {"dense": -1}}, "'dense' must be at least 0"),
        ({"score_mode": "hybrid", "score_weights": {"dense": True}}, "'dense' must be a number"),
        ({"score_mode": "hybrid", "score_weights": [1, 2]}, "'score_weights' must be a mapping"),
        (
            {"score_mode": "hybrid", "score_weights": {"dense": 0, "sparse": 0, "colbert": 0}},
            "needs a positive weight",
        ),
    ],
)
def test_bad_score_modes(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        resolve_score_mode(M3, options)
    assert fragment in caught.value.message


# ---- end to end over gRPC ---------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServerHandle]:
    root = tmp_path_factory.mktemp("options")
    folder = dense.build_tiny_dense(root / "dense")
    write_catalog_entry(
        root / "catalog",
        {
            "name": "tiny/dense",
            "adapter": "dense",
            "weights_path": str(folder),
            "max_sequence_length": 64,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
            "profiles": {
                "default": {"output_types": ["dense"]},
                "retrieval": {
                    "output_types": ["dense"],
                    "options": {"query_template": "query: {text}"},
                },
            },
        },
    )
    async with serving([root / "catalog"], preload=["tiny/dense"]) as handle:
        yield handle


def request(options: dict[str, Any] | None = None, **params: Any) -> encode_pb2.EncodeRequest:
    req = encode_pb2.EncodeRequest(
        model="tiny/dense",
        items=[common_pb2.Item(text="Hello, world!"), common_pb2.Item(text="Vector search")],
        params=encode_pb2.EncodeParams(**params),
    )
    if options:
        req.params.options.update(options)
    return req


async def test_is_query_in_options_over_grpc_equals_the_field(server: ServerHandle) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    typed = await stub.Encode(request({"profile": "retrieval"}, is_query=True))
    in_options = await stub.Encode(request({"profile": "retrieval", "is_query": True}))
    document = await stub.Encode(request({"profile": "retrieval"}))
    for a, b, c in zip(typed.items, in_options.items, document.items, strict=True):
        assert from_tensor(a.dense.values).tobytes() == from_tensor(b.dense.values).tobytes()
        assert not np.allclose(from_tensor(a.dense.values), from_tensor(c.dense.values))
        assert a.num_tokens == b.num_tokens == c.num_tokens + 2  # "query", ":"
    dtype = await stub.Encode(request({"output_dtype": "binary"}))
    assert dtype.items[0].dense.values.dtype == common_pb2.DTYPE_BINARY


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"query_template": "q: {query}"}, "option 'query_template' uses placeholder {query}"),
        ({"score_threshold": 0.5}, "unknown option 'score_threshold'"),
        ({"is_query": 1}, "option 'is_query' must be true or false"),
    ],
)
async def test_bad_options_over_grpc_are_invalid_input(
    server: ServerHandle, options: dict[str, Any], fragment: str
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(request(options))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (caught.value.details() or "")
    assert error_info(caught.value)[0] == "INVALID_INPUT"


async def test_bad_score_options_over_grpc_are_invalid_input(server: ServerHandle) -> None:
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    req = score_pb2.ScoreRequest(
        model="tiny/dense", query=common_pb2.Item(text="q"), items=[common_pb2.Item(text="d")]
    )
    req.options.update({"score_mode": "sparse"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'score_mode' must be one of dense" in (caught.value.details() or "")
    assert error_info(caught.value)[0] == "INVALID_INPUT"


async def test_encode_items_without_ids_get_item_index(server: ServerHandle) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    req = request()
    req.items[1].id = "mine"
    response = await stub.Encode(req)
    assert [item.id for item in response.items] == ["item-0", "mine"]


def test_output_type_order_does_not_split_batches() -> None:
    one = resolve_encode(
        M3, ITEMS, EncodeParams(output_types=["sparse", "dense"]), accepted_options=(), limits=4
    )
    other = resolve_encode(
        M3,
        ITEMS,
        EncodeParams(options={"output_types": ["dense", "multivector", "sparse", "dense"]}),
        accepted_options=(),
        limits=4,
    )
    assert one.settings.output_types == ("dense", "sparse")
    assert other.settings.output_types == ("dense", "sparse", "multivector")
    same = resolve_encode(
        M3, ITEMS, EncodeParams(output_types=["dense", "sparse"]), accepted_options=(), limits=4
    )
    assert one.settings.batch_key() == same.settings.batch_key()
