"""What the HTTP bridge needs from the server, over gRPC with tiny models: token-id input
(``Item.token_ids``), ``EncodeParams.dimensions`` on Matryoshka (``truncatable``) models, and
``<name>:<profile>`` model names, each against an independent reference, with its error paths."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2,
    extract_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)
from sie_server.catalog import CatalogError
from sie_server.catalog.spec import parse_spec
from sie_server.errors import InvalidInput
from sie_server.grpc_api.convert import input_items
from sie_server.tasks.encode import resolve_dimensions

from tests.server_utils import ServerHandle, error_info, fake_entry, serving, write_catalog_entry
from tests.tiny_models import dense

TEXTS = [
    "Hello, world!",
    "A longer sentence about vector search, batching and padding in an inference server.",
]
SHORT_MAXLEN = 16
CUT = 8  # dims kept by the Matryoshka tests (of dense.HIDDEN = 32)
RETRIEVAL = {"query_template": "query: {text}", "document_template": "passage: {text}"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dense.build_tiny_dense(tmp_path_factory.mktemp("features") / "dense")


@pytest.fixture(scope="module")
def catalog_dir(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def entry(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "adapter": "dense",
            "weights_path": str(weights),
            "max_sequence_length": 128,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
            **extra,
        }

    profiles = {
        "default": {"output_types": ["dense"]},
        "retrieval": {"output_types": ["dense"], "options": RETRIEVAL},
    }
    catalog = tmp_path_factory.mktemp("features-catalog")
    for item in (
        entry("tiny/dense", profiles=profiles),
        entry("tiny/dense-short", max_sequence_length=SHORT_MAXLEN),
        entry(
            "tiny/matryoshka",
            outputs={"dense": {"dims": dense.HIDDEN, "truncatable": True}},
            profiles={
                **profiles,
                "small": {"output_types": ["dense"], "options": {"dimensions": 4}},
            },
        ),
        fake_entry("fake/words"),
    ):
        write_catalog_entry(catalog, item)
    return catalog


PRELOAD = ["tiny/dense", "tiny/dense-short", "tiny/matryoshka", "fake/words"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=PRELOAD, max_items_per_request=8) as handle:
        yield handle


@pytest.fixture
def stub(server: ServerHandle) -> encode_pb2_grpc.EncodeServiceStub:
    return encode_pb2_grpc.EncodeServiceStub(server.channel)


@pytest.fixture(scope="module")
def tokenizer(weights: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(weights))


def request(
    model: str, items: Sequence[common_pb2.Item | str], **params: Any
) -> encode_pb2.EncodeRequest:
    options = params.pop("options", None)
    req = encode_pb2.EncodeRequest(
        model=model,
        items=[common_pb2.Item(text=i) if isinstance(i, str) else i for i in items],
        params=encode_pb2.EncodeParams(**params),
    )
    if options:
        req.params.options.update(options)
    return req


def dense_of(response: encode_pb2.EncodeResponse) -> np.ndarray:
    return np.stack([from_tensor(item.dense.values) for item in response.items])


async def refused(call: Any, req: Any) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """(code, ErrorInfo reason, message, ErrorInfo metadata) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(req)
    reason, metadata, _ = error_info(caught.value)
    return caught.value.code(), reason, caught.value.details() or "", metadata


async def assert_invalid(call: Any, req: Any, fragment: str) -> None:
    code, reason, message, _ = await refused(call, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert fragment in message


# ---- token ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "text", "params"),
    [
        ("tiny/dense", TEXTS[0], {}),
        ("tiny/dense", TEXTS[1], {}),
        # Templates apply to the decoded text as to text.
        ("tiny/dense", TEXTS[1], {"is_query": True, "options": {"profile": "retrieval"}}),
        # Truncation too: 40 words on a 16-token model.
        ("tiny/dense-short", " ".join(["word"] * 40), {}),
    ],
)
async def test_token_ids_encode_like_their_text(
    stub: Any, tokenizer: Any, model: str, text: str, params: dict[str, Any]
) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # One request each, so that both run as a batch of one with the same shapes.
    by_text = await stub.Encode(request(model, [text], **params))
    by_ids = await stub.Encode(request(model, [common_pb2.Item(id="ids", token_ids=ids)], **params))
    np.testing.assert_array_equal(dense_of(by_ids), dense_of(by_text))
    got, want = by_ids.items[0], by_text.items[0]
    assert got.id == "ids"
    assert got.num_tokens == want.num_tokens
    assert got.truncated == want.truncated
    if model == "tiny/dense-short":
        assert got.truncated
        assert got.num_tokens == SHORT_MAXLEN


async def test_token_ids_out_of_vocabulary_or_with_text(stub: Any, tokenizer: Any) -> None:
    vocab = len(tokenizer)
    ok = common_pb2.Item(token_ids=[7592])
    for bad_id in (vocab, -1):
        await assert_invalid(
            stub.Encode,
            request("tiny/dense", [ok, common_pb2.Item(token_ids=[7592, bad_id])]),
            f"item 1: token id {bad_id} is outside the vocabulary of tiny/dense (0..{vocab - 1})",
        )
    await assert_invalid(
        stub.Encode,
        request("tiny/dense", [common_pb2.Item(text="hello", token_ids=[7592])]),
        "item 0 has both text and token_ids",
    )


async def test_token_ids_refused_where_not_decoded(server: ServerHandle, stub: Any) -> None:
    # A family without a tokenizer to decode them (the fake) refuses them, naming the item.
    await assert_invalid(
        stub.Encode,
        request("fake/words", ["a b", common_pb2.Item(token_ids=[5, 6])]),
        "item 1: model fake/words does not accept token ids",
    )
    # Score and Extract take text only (the bi-encoder score path would decode them, but the
    # query could not be token ids, so the rule is one: Encode only).
    scores = score_pb2_grpc.ScoreServiceStub(server.channel)
    await assert_invalid(
        scores.Score,
        score_pb2.ScoreRequest(
            model="tiny/dense",
            query=common_pb2.Item(text="q"),
            items=[common_pb2.Item(token_ids=[7592])],
        ),
        "item 0: token_ids are accepted by Encode only",
    )
    # Extract converts its items as Score does (no extractor served here).
    with pytest.raises(InvalidInput, match="item 0: token_ids are accepted by Encode only"):
        input_items([common_pb2.Item(token_ids=[7592])], "m/x")
    (converted,) = input_items([common_pb2.Item(token_ids=[5, 6])], "m/x", token_ids=True)
    assert converted.token_ids == (5, 6)


# ---- dimensions --------------------------------------------------------------------------------


def reference_truncated(weights: Path, texts: Sequence[str], dims: int) -> np.ndarray:
    """sentence-transformers' own Matryoshka path: ``truncate_dim`` then normalize."""
    vectors = dense.reference_st(weights, texts, truncate_dim=dims, normalize_embeddings=True)
    assert vectors.shape == (len(texts), dims)
    return vectors


async def test_dimensions_truncate_and_renormalize(stub: Any, weights: Path) -> None:
    want = reference_truncated(weights, TEXTS, CUT)
    # The reference is not merely the full vector's head: the head is renormalized.
    full = dense.reference_st(weights, TEXTS)
    assert not np.allclose(full[:, :CUT], want, atol=1e-3)
    np.testing.assert_allclose(
        want, full[:, :CUT] / np.linalg.norm(full[:, :CUT], axis=1, keepdims=True), atol=1e-6
    )
    for params in ({"dimensions": CUT}, {"options": {"dimensions": CUT}}):
        response = await stub.Encode(request("tiny/matryoshka", TEXTS, **params))
        got = dense_of(response)
        assert got.shape == (len(TEXTS), CUT)
        assert all(item.dense.dims == CUT for item in response.items)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # The typed field wins over options; a profile's dimensions apply unless the request says.
    typed = await stub.Encode(
        request("tiny/matryoshka", TEXTS, dimensions=CUT, options={"dimensions": 16})
    )
    np.testing.assert_allclose(dense_of(typed), want, atol=1e-5)
    small = await stub.Encode(request("tiny/matryoshka:small", TEXTS))
    np.testing.assert_allclose(dense_of(small), reference_truncated(weights, TEXTS, 4), atol=1e-5)


async def test_dimensions_before_quantization(stub: Any) -> None:
    """int8 quantizes the truncated, renormalized vector (its largest value maps to 127)."""
    exact = dense_of(await stub.Encode(request("tiny/matryoshka", TEXTS, dimensions=CUT)))
    quantized = await stub.Encode(
        request("tiny/matryoshka", TEXTS, dimensions=CUT, output_dtype="int8")
    )
    got = dense_of(quantized)
    assert got.dtype == np.int8
    assert got.shape == (len(TEXTS), CUT)
    assert quantized.items[0].dense.dims == CUT
    scaled = exact.astype(np.float64) * 127 / np.abs(exact).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - scaled) <= 0.5 + 1e-4)


async def test_full_dimensions_are_a_no_op_for_any_model(stub: Any) -> None:
    plain = await stub.Encode(request("tiny/dense", TEXTS))
    same = await stub.Encode(request("tiny/dense", TEXTS, dimensions=dense.HIDDEN))
    np.testing.assert_array_equal(dense_of(same), dense_of(plain))
    assert same.items[0].dense.dims == dense.HIDDEN


@pytest.mark.parametrize(
    ("model", "params", "fragment"),
    [
        ("tiny/dense", {"dimensions": CUT}, "not truncatable"),
        ("tiny/matryoshka", {"dimensions": 0}, "between 1 and 32"),
        ("tiny/matryoshka", {"dimensions": dense.HIDDEN + 1}, "between 1 and 32"),
        ("tiny/matryoshka", {"options": {"dimensions": 2.5}}, "'dimensions' must be an integer"),
        ("tiny/matryoshka", {"options": {"dimensions": "8"}}, "'dimensions' must be an integer"),
    ],
)
async def test_dimensions_refused(
    stub: Any, model: str, params: dict[str, Any], fragment: str
) -> None:
    await assert_invalid(stub.Encode, request(model, TEXTS[:1], **params), fragment)


def test_dimensions_need_a_dense_output() -> None:
    spec = parse_spec(
        {
            "name": "m/hybrid",
            "adapter": "bge_m3",
            "hf_id": "m/hybrid",
            "max_sequence_length": 8,
            "outputs": {
                "dense": {"dims": 8, "truncatable": True},
                "sparse": {"dims": 100, "similarity": "dot"},
            },
        }
    )
    assert resolve_dimensions(spec, 4, ("dense", "sparse")) == 4
    assert resolve_dimensions(spec, 8, ("dense",)) is None
    with pytest.raises(InvalidInput, match="dimensions applies to dense vectors"):
        resolve_dimensions(spec, 4, ("sparse",))
    # A profile's dimensions does not stop a request for sparse vectors only.
    assert resolve_dimensions(spec, 4, ("sparse",), requested=False) is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"outputs": {"sparse": {"dims": 9, "truncatable": True}}}, "only a dense output"),
        ({"outputs": {"dense": {"dims": 9, "truncatable": "yes"}}}, "true or false"),
        ({"outputs": {"dense": {"dims": 9, "truncateable": True}}}, "unknown key 'truncateable'"),
        ({"name": "m/x:y"}, "must not contain ':'"),
    ],
)
def test_catalog_checks(change: dict[str, Any], fragment: str) -> None:
    raw = {"name": "m/x", "adapter": "dense", "hf_id": "m/x", "max_sequence_length": 8}
    raw["outputs"] = {"dense": {"dims": 9}}
    with pytest.raises(CatalogError, match=fragment):
        parse_spec({**raw, **change})


# ---- name:profile --------------------------------------------------------------------------------


async def test_name_profile_selects_the_profile(stub: Any, server: ServerHandle) -> None:
    by_option = await stub.Encode(
        request("tiny/dense", TEXTS, is_query=True, options={"profile": "retrieval"})
    )
    by_name = await stub.Encode(request("tiny/dense:retrieval", TEXTS, is_query=True))
    assert by_name.model == "tiny/dense:retrieval"
    np.testing.assert_array_equal(dense_of(by_name), dense_of(by_option))
    # The template made a difference, and naming the same profile twice is fine.
    plain = await stub.Encode(request("tiny/dense", TEXTS, is_query=True))
    assert not np.allclose(dense_of(plain), dense_of(by_name), atol=1e-4)
    both = await stub.Encode(
        request("tiny/dense:retrieval", TEXTS, is_query=True, options={"profile": "retrieval"})
    )
    np.testing.assert_array_equal(dense_of(both), dense_of(by_option))

    scores = score_pb2_grpc.ScoreServiceStub(server.channel)

    def score(model: str, options: dict[str, Any] | None = None) -> score_pb2.ScoreRequest:
        req = score_pb2.ScoreRequest(
            model=model,
            query=common_pb2.Item(text="vector search"),
            items=[common_pb2.Item(text=t) for t in TEXTS],
        )
        if options:
            req.options.update(options)
        return req

    want = await scores.Score(score("tiny/dense", {"profile": "retrieval"}))
    got = await scores.Score(score("tiny/dense:retrieval"))
    assert got.model == "tiny/dense:retrieval"
    assert [(s.item_id, s.score) for s in got.scores] == [(s.item_id, s.score) for s in want.scores]


async def test_name_profile_errors(stub: Any, server: ServerHandle) -> None:
    code, reason, message, metadata = await refused(
        stub.Encode,
        request("tiny/dense:retrieval", TEXTS[:1], options={"profile": "default"}),
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert "selects profile 'retrieval', but options.profile is 'default'" in message
    assert metadata == {"model": "tiny/dense:retrieval"}

    code, reason, message, _ = await refused(stub.Encode, request("tiny/dense:nope", TEXTS[:1]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert "unknown profile 'nope'" in message
    assert "(profiles of tiny/dense: default, retrieval)" in message

    for name in ("no/such:retrieval", "tiny/dense-missing:default"):
        code, reason, _, metadata = await refused(stub.Encode, request(name, TEXTS[:1]))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
        assert metadata == {"model": name}

    # Every RPC resolves the name the same way.
    extracts = extract_pb2_grpc.ExtractServiceStub(server.channel)
    await assert_invalid(
        extracts.Extract,
        extract_pb2.ExtractRequest(model="tiny/dense:nope", items=[common_pb2.Item(text="x")]),
        "unknown profile 'nope'",
    )
    await assert_invalid(
        extracts.Extract,
        extract_pb2.ExtractRequest(model="tiny/dense:retrieval", items=[common_pb2.Item(text="x")]),
        "model tiny/dense:retrieval does not support extract",
    )


async def test_get_model_takes_a_variant_and_list_models_does_not_show_them(
    server: ServerHandle,
) -> None:
    models = models_pb2_grpc.ModelServiceStub(server.channel)
    info = (await models.GetModel(models_pb2.GetModelRequest(name="tiny/dense:retrieval"))).model
    assert info.name == "tiny/dense:retrieval"
    assert info.loaded
    assert info.profiles["retrieval"].is_default
    assert not info.profiles["default"].is_default
    base = (await models.GetModel(models_pb2.GetModelRequest(name="tiny/dense"))).model
    assert base.profiles["default"].is_default
    code, reason, _, _ = await refused(
        models.GetModel, models_pb2.GetModelRequest(name="tiny/dense:nope")
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    listed = [m.name for m in (await models.ListModels(models_pb2.ListModelsRequest())).models]
    assert sorted(listed) == sorted(PRELOAD)
