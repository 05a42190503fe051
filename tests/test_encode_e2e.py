"""End to end over gRPC: tiny checkpoints of real architectures served through the catalog,
each output checked against a reference computed independently in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, models_pb2, models_pb2_grpc

from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import bge_m3, colbert, dense, splade

TEXTS = [
    "Hello, world!",
    "A longer sentence about vector search, batching and padding in an inference server.",
    "x",
    "Tokenization latency matters when many short queries arrive at once.",
]
DOC_MAXLEN = 48
QUERY_MAXLEN = 16


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    dense_dir = dense.build_tiny_dense(root / "dense")
    entries: list[dict[str, Any]] = [
        {
            "name": "tiny/dense",
            "adapter": "dense",
            "weights_path": str(dense_dir),
            "max_sequence_length": 128,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
            "profiles": {
                "default": {"output_types": ["dense"]},
                "retrieval": {
                    "output_types": ["dense"],
                    "options": {
                        "query_template": "query: {text}",
                        "document_template": "passage: {text}",
                    },
                },
            },
        },
        {
            "name": "tiny/dense-short",
            "adapter": "dense",
            "weights_path": str(dense_dir),
            "max_sequence_length": 16,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
        {
            "name": "tiny/lazy",
            "adapter": "dense",
            "weights_path": str(dense_dir),
            "max_sequence_length": 128,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
        {
            "name": "tiny/bge-m3",
            "adapter": "bge_m3",
            "weights_path": str(bge_m3.build_tiny_bge_m3(root / "bge-m3")),
            "max_sequence_length": 128,
            "outputs": {
                "dense": {"dims": bge_m3.HIDDEN},
                "sparse": {"dims": 1000, "similarity": "dot"},
                "multivector": {"dims": bge_m3.HIDDEN, "similarity": "maxsim"},
            },
            "profiles": {
                "default": {"output_types": ["dense"]},
                "sparse": {"output_types": ["sparse"]},
            },
        },
        {
            "name": "tiny/splade",
            "adapter": "splade",
            "weights_path": str(splade.build_tiny_splade(root / "splade")),
            "max_sequence_length": 128,
            "outputs": {"sparse": {"dims": 30522, "similarity": "dot"}},
        },
        {
            "name": "tiny/colbert",
            "adapter": "colbert",
            "weights_path": str(colbert.build_tiny_colbert(root / "colbert")),
            "max_sequence_length": 128,
            "load_options": {"doc_maxlen": DOC_MAXLEN, "query_maxlen": QUERY_MAXLEN},
            "outputs": {"multivector": {"dims": 16, "similarity": "maxsim"}},
        },
    ]
    catalog = root / "catalog"
    for entry in entries:
        write_catalog_entry(catalog, entry)
    return catalog


PRELOAD = ["tiny/dense", "tiny/dense-short", "tiny/bge-m3", "tiny/splade", "tiny/colbert"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=PRELOAD, max_items_per_request=16) as handle:
        yield handle


@pytest.fixture
def stub(server: ServerHandle) -> encode_pb2_grpc.EncodeServiceStub:
    return encode_pb2_grpc.EncodeServiceStub(server.channel)


def request(model: str, texts: Sequence[str], **params: Any) -> encode_pb2.EncodeRequest:
    options = params.pop("options", None)
    req = encode_pb2.EncodeRequest(
        model=model,
        items=[common_pb2.Item(id=f"item-{i}", text=t) for i, t in enumerate(texts)],
        params=encode_pb2.EncodeParams(**params),
    )
    if options:
        req.params.options.update(options)
    return req


def dense_of(response: encode_pb2.EncodeResponse) -> np.ndarray:
    return np.stack([from_tensor(item.dense.values) for item in response.items])


# ---- dense -----------------------------------------------------------------------------------


async def test_dense_equals_sentence_transformers(stub: Any, catalog_dir: Path) -> None:
    response = await stub.Encode(request("tiny/dense", TEXTS))
    assert response.model == "tiny/dense"
    assert [item.id for item in response.items] == [f"item-{i}" for i in range(len(TEXTS))]
    want = dense.reference_dense(_weights(catalog_dir, "tiny/dense"), TEXTS)
    got = dense_of(response)
    assert got.dtype == np.float32
    assert all(item.dense.dims == dense.HIDDEN for item in response.items)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert response.timing.total_ms >= response.timing.inference_ms > 0


async def test_token_counts_and_truncation(stub: Any, catalog_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_weights(catalog_dir, "tiny/dense"))
    long_text = " ".join(["word"] * 40)
    response = await stub.Encode(request("tiny/dense-short", ["short text", long_text]))
    short, long = response.items
    assert short.num_tokens == len(tokenizer("short text")["input_ids"])
    assert not short.truncated
    assert long.num_tokens == 16
    assert long.truncated
    # The truncated vector is the model's encoding of the first 16 tokens.
    cut = tokenizer.decode(tokenizer(long_text)["input_ids"][1:15])
    want = dense.reference_dense(_weights(catalog_dir, "tiny/dense"), [cut])
    np.testing.assert_allclose(from_tensor(long.dense.values), want[0], atol=1e-5)


async def test_query_and_document_templates(stub: Any, catalog_dir: Path) -> None:
    folder = _weights(catalog_dir, "tiny/dense")
    options = {"profile": "retrieval"}
    query = await stub.Encode(request("tiny/dense", TEXTS[:2], is_query=True, options=options))
    doc = await stub.Encode(request("tiny/dense", TEXTS[:2], options=options))
    np.testing.assert_allclose(
        dense_of(query),
        dense.reference_dense(folder, [f"query: {t}" for t in TEXTS[:2]]),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        dense_of(doc),
        dense.reference_dense(folder, [f"passage: {t}" for t in TEXTS[:2]]),
        atol=1e-5,
    )
    instructed = await stub.Encode(request("tiny/dense", TEXTS[:1], instruction="Find docs:"))
    np.testing.assert_allclose(
        dense_of(instructed), dense.reference_dense(folder, [f"Find docs: {TEXTS[0]}"]), atol=1e-5
    )


# ---- bge-m3: three outputs, one forward pass ------------------------------------------------------


async def test_bge_m3_all_outputs_from_one_forward_pass(
    stub: Any, server: ServerHandle, catalog_dir: Path
) -> None:
    metrics = server.running.registry.metrics
    before = metrics.counter("sie_batches_total", model="tiny/bge-m3", status="ok")
    response = await stub.Encode(
        request("tiny/bge-m3", TEXTS[1:2], output_types=["dense", "sparse", "multivector"])
    )
    assert metrics.counter("sie_batches_total", model="tiny/bge-m3", status="ok") == before + 1

    response = await stub.Encode(
        request("tiny/bge-m3", TEXTS, output_types=["dense", "sparse", "multivector"])
    )
    want = bge_m3.reference_bge_m3(_weights(catalog_dir, "tiny/bge-m3"), TEXTS, 128)
    for item, ref in zip(response.items, want, strict=True):
        np.testing.assert_allclose(from_tensor(item.dense.values), ref["dense"], atol=1e-5)
        indices = from_tensor(item.sparse.indices)
        assert item.sparse.dims == 1000
        assert list(indices) == sorted(ref["sparse"])
        np.testing.assert_allclose(
            from_tensor(item.sparse.values), [ref["sparse"][i] for i in indices], atol=1e-5
        )
        mv = from_tensor(item.multivector.values)
        assert item.multivector.num_tokens == mv.shape[0] == item.num_tokens - 1
        assert item.multivector.token_dims == bge_m3.HIDDEN
        np.testing.assert_allclose(mv, ref["multivector"], atol=1e-5)


async def test_profile_selects_default_outputs(stub: Any) -> None:
    response = await stub.Encode(request("tiny/bge-m3", TEXTS[:1], options={"profile": "sparse"}))
    item = response.items[0]
    assert item.HasField("sparse")
    assert not item.HasField("dense")
    default = await stub.Encode(request("tiny/bge-m3", TEXTS[:1]))
    assert default.items[0].HasField("dense")
    assert not default.items[0].HasField("sparse")


# ---- SPLADE and ColBERT ---------------------------------------------------------------------------


async def test_splade_equals_sparse_encoder(stub: Any, catalog_dir: Path) -> None:
    response = await stub.Encode(request("tiny/splade", TEXTS, output_types=["sparse"]))
    want = splade.reference_splade(_weights(catalog_dir, "tiny/splade"), TEXTS, 128)
    for item, ref in zip(response.items, want, strict=True):
        indices = from_tensor(item.sparse.indices)
        assert item.sparse.dims == 30522
        assert list(indices) == sorted(ref)
        np.testing.assert_allclose(
            from_tensor(item.sparse.values), [ref[i] for i in indices], atol=1e-5
        )


@pytest.mark.parametrize("is_query", [True, False])
async def test_colbert_equals_reference(stub: Any, catalog_dir: Path, is_query: bool) -> None:
    response = await stub.Encode(
        request("tiny/colbert", TEXTS, output_types=["multivector"], is_query=is_query)
    )
    want = colbert.reference_colbert(
        _weights(catalog_dir, "tiny/colbert"),
        TEXTS,
        is_query=is_query,
        query_maxlen=QUERY_MAXLEN,
        doc_maxlen=DOC_MAXLEN,
    )
    for item, ref in zip(response.items, want, strict=True):
        mv = from_tensor(item.multivector.values)
        assert item.multivector.num_tokens == mv.shape[0] == ref.shape[0]
        if is_query:
            assert mv.shape[0] == QUERY_MAXLEN
        np.testing.assert_allclose(mv, ref, atol=1e-5)


# ---- output dtypes --------------------------------------------------------------------------------


def assert_rounds_to(got: np.ndarray, exact: np.ndarray) -> None:
    """``got`` is ``exact`` rounded to an integer: within one half of it everywhere (a tie may
    go either way, as float32 and float64 arithmetic may disagree on it)."""
    assert np.all(np.abs(got.astype(np.float64) - exact) <= 0.5 + 1e-4)


def int8_exact(x: np.ndarray) -> np.ndarray:
    """x * 127 / max|x| per row, before rounding."""
    x = x.astype(np.float64)
    exact: np.ndarray = x * 127 / np.abs(x).max(axis=-1, keepdims=True)
    return exact


def uint8_exact(x: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) * 255 per row, before rounding."""
    x = x.astype(np.float64)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    exact: np.ndarray = (x - lo) / (hi - lo) * 255
    return exact


def sign_bytes(x: np.ndarray) -> np.ndarray:
    """One bit per value (x > 0), eight to a byte, the first value in the high bit."""
    bits = (x > 0).astype(np.int64)
    assert bits.shape[-1] % 8 == 0
    weights = np.array([128, 64, 32, 16, 8, 4, 2, 1])
    packed: np.ndarray = (bits.reshape(*bits.shape[:-1], -1, 8) * weights).sum(axis=-1)
    return packed


@pytest.mark.parametrize(
    ("dtype", "enum"),
    [
        ("float16", common_pb2.DTYPE_FLOAT16),
        ("int8", common_pb2.DTYPE_INT8),
        ("uint8", common_pb2.DTYPE_UINT8),
        ("binary", common_pb2.DTYPE_BINARY),
    ],
)
async def test_output_dtypes(stub: Any, dtype: str, enum: int) -> None:
    """The served int8 / uint8 / binary / float16 vectors follow from the served float32 ones
    by the rules of tasks/output_dtype.py, written out here (per row: the dense vector, or one
    token's vector of the multivector)."""
    types = ["dense", "sparse", "multivector"]
    full = await stub.Encode(request("tiny/bge-m3", TEXTS[:2], output_types=types))
    cast = await stub.Encode(
        request("tiny/bge-m3", TEXTS[:2], output_types=types, output_dtype=dtype)
    )
    for ref, item in zip(full.items, cast.items, strict=True):
        assert item.num_tokens == ref.num_tokens
        assert item.dense.values.dtype == enum
        assert item.dense.dims == bge_m3.HIDDEN  # unpacked dims, also for binary
        assert item.multivector.token_dims == bge_m3.HIDDEN
        assert item.multivector.num_tokens == ref.multivector.num_tokens
        for got_tensor, ref_tensor in (
            (item.dense.values, ref.dense.values),
            (item.multivector.values, ref.multivector.values),
        ):
            got, x = from_tensor(got_tensor), from_tensor(ref_tensor)
            assert x.dtype == np.float32
            if dtype == "float16":
                assert got.dtype == np.float16
                np.testing.assert_array_equal(got, x.astype(np.float16))
            elif dtype == "int8":
                assert got.dtype == np.int8
                assert_rounds_to(got, int8_exact(x))
                # The largest magnitude of each row maps to +-127 exactly.
                np.testing.assert_array_equal(np.abs(got.astype(int)).max(axis=-1), 127)
            elif dtype == "uint8":
                assert got.dtype == np.uint8
                assert_rounds_to(got, uint8_exact(x))
                np.testing.assert_array_equal(got.min(axis=-1), 0)
                np.testing.assert_array_equal(got.max(axis=-1), 255)
            else:
                assert got.dtype == np.uint8
                assert got.shape == (*x.shape[:-1], bge_m3.HIDDEN // 8)
                np.testing.assert_array_equal(got, sign_bytes(x))
        # Sparse values are only ever float32 or float16; the indices do not change.
        np.testing.assert_array_equal(
            from_tensor(item.sparse.indices), from_tensor(ref.sparse.indices)
        )
        values, ref_values = from_tensor(item.sparse.values), from_tensor(ref.sparse.values)
        if dtype == "float16":
            assert item.sparse.values.dtype == common_pb2.DTYPE_FLOAT16
            np.testing.assert_array_equal(values, ref_values.astype(np.float16))
        else:
            assert item.sparse.values.dtype == common_pb2.DTYPE_FLOAT32
            np.testing.assert_array_equal(values, ref_values)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "fragment"),
    [
        (request("tiny/dense", TEXTS[:1], output_types=["dense", "colour"]), "unknown output type"),
        (request("tiny/dense", TEXTS[:1], output_types=["sparse"]), "does not produce sparse"),
        (encode_pb2.EncodeRequest(model="tiny/dense"), "items must not be empty"),
        (
            encode_pb2.EncodeRequest(model="tiny/dense", items=[common_pb2.Item(id="a")]),
            "item 0 has no text",
        ),
        (request("tiny/dense", TEXTS[:1], options={"profile": "nope"}), "unknown profile"),
        (request("tiny/dense", TEXTS[:1], output_dtype="int4"), "unknown output_dtype"),
        (request("tiny/dense", ["t"] * 17), "exceed the limit of 16"),
        (request("tiny/colbert", TEXTS[:1], output_types=["dense"]), "does not produce dense"),
        (
            encode_pb2.EncodeRequest(
                model="tiny/dense",
                items=[common_pb2.Item(text="t", images=[common_pb2.ImageInput(data=b"\x89PNG")])],
            ),
            "accepts text only",
        ),
        (
            encode_pb2.EncodeRequest(
                model="tiny/dense",
                items=[
                    common_pb2.Item(document=common_pb2.DocumentInput(data=b"%PDF", format="pdf"))
                ],
            ),
            "does not parse documents",
        ),
    ],
)
async def test_invalid_input(stub: Any, req: encode_pb2.EncodeRequest, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (caught.value.details() or "")
    reason, metadata, retry = error_info(caught.value)
    assert reason == "INVALID_INPUT"
    assert metadata == {"model": req.model}
    assert retry is None


async def test_unknown_model(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(request("no/such-model", TEXTS[:1]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value)[0] == "MODEL_NOT_FOUND"


# ---- lazy loading and the model list ------------------------------------------------------------


async def test_lazy_load_answers_model_loading_then_serves(stub: Any, server: ServerHandle) -> None:
    models = models_pb2_grpc.ModelServiceStub(server.channel)
    info = (await models.GetModel(models_pb2.GetModelRequest(name="tiny/lazy"))).model
    assert info.state == models_pb2.MODEL_STATE_AVAILABLE
    assert not info.loaded
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(request("tiny/lazy", TEXTS[:1]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reason, _, retry = error_info(caught.value)
    assert reason == "MODEL_LOADING"
    assert retry is not None
    assert retry > 0
    assert ("grpc-retry-pushback-ms", str(int(retry * 1000))) in tuple(
        caught.value.trailing_metadata() or ()
    )
    for _ in range(200):
        try:
            response = await stub.Encode(request("tiny/lazy", TEXTS[:1]))
            break
        except grpc.aio.AioRpcError as exc:
            still_loading = error_info(exc)[0] == "MODEL_LOADING"
            if not still_loading:
                raise
            await asyncio.sleep(0.05)
    else:
        pytest.fail("tiny/lazy never finished loading")
    assert response.items[0].dense.dims == dense.HIDDEN
    info = (await models.GetModel(models_pb2.GetModelRequest(name="tiny/lazy"))).model
    assert info.loaded
    assert info.state == models_pb2.MODEL_STATE_LOADED
    assert info.device == "cpu"


async def test_list_models_describes_the_catalog(server: ServerHandle) -> None:
    models = models_pb2_grpc.ModelServiceStub(server.channel)
    listed = {m.name: m for m in (await models.ListModels(models_pb2.ListModelsRequest())).models}
    bge = listed["tiny/bge-m3"]
    assert list(bge.outputs) == ["dense", "sparse", "multivector"]
    assert dict(bge.dims) == {"dense": bge_m3.HIDDEN, "sparse": 1000, "multivector": bge_m3.HIDDEN}
    assert bge.loaded
    assert bge.max_sequence_length == 128
    assert bge.profiles["default"].is_default
    assert dict(bge.profiles["sparse"].output_similarity) == {"sparse": "dot"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await models.GetModel(models_pb2.GetModelRequest(name="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _weights(catalog_dir: Path, name: str) -> Path:
    import yaml

    entry = yaml.safe_load((catalog_dir / (name.replace("/", "__") + ".yaml")).read_text())
    return Path(entry["weights_path"])


async def test_a_model_that_fails_to_load_answers_model_load_failed(tmp_path: Path) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    catalog = tmp_path / "catalog"
    write_catalog_entry(
        catalog,
        {
            "name": "broken/model",
            "adapter": "dense",
            "weights_path": str(empty),
            "max_sequence_length": 8,
            "outputs": {"dense": {"dims": 4}},
        },
    )
    async with serving([catalog]) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        reasons = []
        for _ in range(200):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Encode(request("broken/model", ["x"]))
            reasons.append(error_info(caught.value)[0])
            if reasons[-1] != "MODEL_LOADING":
                break
            await asyncio.sleep(0.05)
        assert reasons[0] == "MODEL_LOADING"
        assert reasons[-1] == "MODEL_LOAD_FAILED"
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "loading broken/model failed" in (caught.value.details() or "")
        models = models_pb2_grpc.ModelServiceStub(handle.channel)
        info = (await models.GetModel(models_pb2.GetModelRequest(name="broken/model"))).model
        assert info.state == models_pb2.MODEL_STATE_FAILED
        assert info.error
