"""Score over gRPC: rerankers (tiny BERT and DeBERTa-v2 cross-encoders against
sentence-transformers' CrossEncoder.predict), bi-encoder scoring on tiny real-architecture encoders
(dense cosine, bge-m3 modes, ColBERT MaxSim, a precomputed query multivector), the response
contract (every item once, sorted, stable ties, ranks, ids), batching across calls, and every
error path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sie_sdk.tensors import from_tensor, to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, score_pb2, score_pb2_grpc

from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import bge_m3, classifiers, colbert, dense
from tests.tiny_models.entries import BGE_M3_OUTPUTS, entry

# transformers' DeBERTa-v2 module uses torch.jit.script, deprecated in torch 2.13 (import time).
pytestmark = pytest.mark.filterwarnings(classifiers.DEBERTA_JIT_WARNING)

QUERY = "How do inference servers batch requests?"
DOCS = [
    "Dynamic batching groups concurrent requests into one forward pass.",
    "The weather is sunny today.",
    "Padding wastes compute when lengths differ.",
    "x",
]


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("score")
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
                    "options": {"query_template": "query: {text}"},
                },
            },
        },
        {
            "name": "tiny/encode-only",
            "adapter": "dense",
            "weights_path": str(dense_dir),
            "max_sequence_length": 128,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
            "tasks": ["encode"],
        },
        entry("tiny/bge-m3", "bge_m3", bge_m3.build_tiny_bge_m3(root / "bge-m3"), BGE_M3_OUTPUTS),
        {
            "name": "tiny/reranker",
            "adapter": "cross_encoder",
            "weights_path": str(classifiers.build_bert_classifier(root / "reranker")),
            "max_sequence_length": 64,
            "outputs": {"score": {}},
        },
        {
            "name": "tiny/deberta-reranker",
            "adapter": "cross_encoder",
            "weights_path": str(classifiers.build_deberta_classifier(root / "deberta", seed=3)),
            "max_sequence_length": 64,
            "outputs": {"score": {}},
        },
        {
            "name": "tiny/colbert",
            "adapter": "colbert",
            "weights_path": str(colbert.build_tiny_colbert(root / "colbert")),
            "max_sequence_length": 128,
            "load_options": {"doc_maxlen": 48, "query_maxlen": 16},
            "outputs": {"multivector": {"dims": colbert.DIM, "similarity": "maxsim"}},
        },
    ]
    for item in entries:
        write_catalog_entry(root / "catalog", item)
    return root / "catalog"


PRELOAD = ["tiny/dense", "tiny/bge-m3", "tiny/colbert", "tiny/reranker", "tiny/deberta-reranker"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=PRELOAD, max_items_per_request=8) as handle:
        yield handle


@pytest.fixture
def stub(server: ServerHandle) -> score_pb2_grpc.ScoreServiceStub:
    return score_pb2_grpc.ScoreServiceStub(server.channel)


def score_request(
    model: str,
    docs: Sequence[str] = DOCS,
    *,
    query: str | None = QUERY,
    ids: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    **fields: Any,
) -> score_pb2.ScoreRequest:
    req = score_pb2.ScoreRequest(
        model=model,
        items=[
            common_pb2.Item(id=(ids[i] if ids else ""), text=text) for i, text in enumerate(docs)
        ],
        **fields,
    )
    if query is not None:
        req.query.CopyFrom(common_pb2.Item(id="q-1", text=query))
    if options:
        req.options.update(options)
    return req


async def encode(
    server: ServerHandle, model: str, texts: Sequence[str], **params: Any
) -> list[encode_pb2.EncodeResult]:
    options = params.pop("options", None)
    req = encode_pb2.EncodeRequest(
        model=model,
        items=[common_pb2.Item(text=t) for t in texts],
        params=encode_pb2.EncodeParams(**params),
    )
    if options:
        req.params.options.update(options)
    response = await encode_pb2_grpc.EncodeServiceStub(server.channel).Encode(req)
    return list(response.items)


def by_index(response: score_pb2.ScoreResponse) -> list[float]:
    """Scores in request order (ids are item-<index> when the request gave none)."""
    scores = {entry.item_id: entry.score for entry in response.scores}
    return [scores[f"item-{i}"] for i in range(len(scores))]


def maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    """Late interaction written out: each query vector's best dot product, summed."""
    return float(sum(max(float(q @ d) for d in doc) for q in query))


# ---- the response contract ------------------------------------------------------------------------


async def test_every_item_once_sorted_ranked_with_ids(stub: Any) -> None:
    docs = [*DOCS, DOCS[1]]  # a duplicate ties with its twin
    ids = ["a", "", "c", "", "e"]
    response = await stub.Score(score_request("tiny/dense", docs, ids=ids))
    assert response.model == "tiny/dense"
    assert response.query_id == "q-1"
    entries = list(response.scores)
    assert sorted(e.item_id for e in entries) == sorted(["a", "item-1", "c", "item-3", "e"])
    assert [e.rank for e in entries] == list(range(len(docs)))
    scores = [e.score for e in entries]
    assert scores == sorted(scores, reverse=True)
    twins = [e.item_id for e in entries if e.item_id in ("item-1", "e")]
    assert twins == ["item-1", "e"], "ties keep request order"
    assert response.timing.total_ms >= response.timing.inference_ms > 0


async def test_dense_scores_are_cosines_of_the_encoded_vectors(
    stub: Any, server: ServerHandle, catalog_dir: Path
) -> None:
    response = await stub.Score(score_request("tiny/dense"))
    folder = catalog_dir.parent / "dense" / "st"
    vectors = dense.reference_dense(folder, [QUERY, *DOCS])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(by_index(response), unit[1:] @ unit[0], atol=1e-5)


async def test_the_query_is_encoded_as_a_query_with_the_instruction(
    stub: Any, catalog_dir: Path
) -> None:
    folder = catalog_dir.parent / "dense" / "st"
    templated = await stub.Score(score_request("tiny/dense", options={"profile": "retrieval"}))
    instructed = await stub.Score(score_request("tiny/dense", instruction="Represent:"))
    for response, query in ((templated, f"query: {QUERY}"), (instructed, f"Represent: {QUERY}")):
        vectors = dense.reference_dense(folder, [query, *DOCS])
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        np.testing.assert_allclose(by_index(response), unit[1:] @ unit[0], atol=1e-5)


# ---- rerankers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "folder"), [("tiny/reranker", "reranker"), ("tiny/deberta-reranker", "deberta")]
)
async def test_rerankers_score_as_cross_encoder_predict(
    stub: Any, catalog_dir: Path, model: str, folder: str
) -> None:
    response = await stub.Score(score_request(model, ids=["a", "b", "c", "d"]))
    want = classifiers.cross_encoder_scores(catalog_dir.parent / folder, [(QUERY, d) for d in DOCS])
    got = {entry.item_id: entry.score for entry in response.scores}
    np.testing.assert_allclose([got[i] for i in "abcd"], want, atol=1e-5)
    assert [entry.item_id for entry in response.scores] == [
        "abcd"[i] for i in np.argsort(-want, kind="stable")
    ]
    instructed = await stub.Score(score_request(model, instruction="Rank for retrieval:"))
    want = classifiers.cross_encoder_scores(
        catalog_dir.parent / folder, [(f"Rank for retrieval: {QUERY}", d) for d in DOCS]
    )
    np.testing.assert_allclose(by_index(instructed), want, atol=1e-5)


async def test_reranker_cuts_the_document_only_and_counts_real_tokens(
    stub: Any, server: ServerHandle
) -> None:
    metrics = server.running.registry.metrics
    before = metrics.counter("sie_tokens_processed_total", model="tiny/reranker")
    long_doc = " ".join(["batching"] * 200)
    response = await stub.Score(score_request("tiny/reranker", [long_doc, DOCS[0]]))
    assert len(response.scores) == 2
    from transformers import AutoTokenizer

    adapter = server.running.registry.entry("tiny/reranker").adapter
    tokenizer = AutoTokenizer.from_pretrained(adapter.spec.weights_source())  # type: ignore[union-attr]
    short = len(tokenizer(QUERY, DOCS[0])["input_ids"])
    assert (
        metrics.counter("sie_tokens_processed_total", model="tiny/reranker") - before == 64 + short
    )


async def test_a_query_longer_than_the_reranker_window_is_input_too_long(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(score_request("tiny/reranker", query=" ".join(["why"] * 100)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value)[0] == "INPUT_TOO_LONG"
    assert "the query is 100 tokens" in (caught.value.details() or "")


# ---- multi-output and late-interaction models -------------------------------------------------------


async def test_bge_m3_modes_match_the_served_vectors(stub: Any, server: ServerHandle) -> None:
    types = ["dense", "sparse", "multivector"]
    (query,) = await encode(server, "tiny/bge-m3", [QUERY], output_types=types, is_query=True)
    docs = await encode(server, "tiny/bge-m3", DOCS, output_types=types)
    q_dense = from_tensor(query.dense.values)
    q_sparse = dict(
        zip(from_tensor(query.sparse.indices), from_tensor(query.sparse.values), strict=True)
    )
    q_multi = from_tensor(query.multivector.values)
    expected: dict[str, list[float]] = {"dense": [], "sparse": [], "colbert": []}
    for doc in docs:
        expected["dense"].append(float(q_dense @ from_tensor(doc.dense.values)))
        d_sparse = zip(from_tensor(doc.sparse.indices), from_tensor(doc.sparse.values), strict=True)
        expected["sparse"].append(
            sum(float(q_sparse[i]) * float(w) for i, w in d_sparse if i in q_sparse)
        )
        expected["colbert"].append(
            maxsim(q_multi, from_tensor(doc.multivector.values)) / len(q_multi)
        )
    for mode in ("dense", "sparse", "colbert"):
        response = await stub.Score(score_request("tiny/bge-m3", options={"score_mode": mode}))
        np.testing.assert_allclose(by_index(response), expected[mode], atol=1e-5, err_msg=mode)
    default = await stub.Score(score_request("tiny/bge-m3"))
    np.testing.assert_allclose(by_index(default), expected["dense"], atol=1e-5)
    hybrid = await stub.Score(score_request("tiny/bge-m3", options={"score_mode": "hybrid"}))
    want = [
        0.4 * d + 0.2 * s + 0.4 * c
        for d, s, c in zip(expected["dense"], expected["sparse"], expected["colbert"], strict=True)
    ]
    np.testing.assert_allclose(by_index(hybrid), want, atol=1e-5)
    weighted = await stub.Score(
        score_request(
            "tiny/bge-m3",
            options={"score_mode": "hybrid", "score_weights": {"dense": 1.0, "colbert": 0}},
        )
    )
    want = [d + 0.2 * s for d, s in zip(expected["dense"], expected["sparse"], strict=True)]
    np.testing.assert_allclose(by_index(weighted), want, atol=1e-5)


async def test_colbert_scores_are_maxsim_and_a_given_query_multivector_is_not_reencoded(
    stub: Any, server: ServerHandle
) -> None:
    (query,) = await encode(server, "tiny/colbert", [QUERY], is_query=True)
    docs = await encode(server, "tiny/colbert", DOCS)
    q_multi = from_tensor(query.multivector.values)
    want = [maxsim(q_multi, from_tensor(doc.multivector.values)) for doc in docs]
    response = await stub.Score(score_request("tiny/colbert"))
    np.testing.assert_allclose(by_index(response), want, atol=1e-5)

    metrics = server.running.registry.metrics
    tokens_before = metrics.counter("sie_tokens_processed_total", model="tiny/colbert")
    given = score_request("tiny/colbert", query=None)
    given.query.CopyFrom(
        common_pb2.Item(id="pre", multivector=to_tensor(q_multi, common_pb2.DTYPE_FLOAT16))
    )
    precomputed = await stub.Score(given)
    assert precomputed.query_id == "pre"
    half = q_multi.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(
        by_index(precomputed),
        [maxsim(half, from_tensor(d.multivector.values)) for d in docs],
        atol=1e-4,
    )
    # On bge-m3 a query multivector implies score_mode colbert (MaxSim / query length).
    (m3_query,) = await encode(server, "tiny/bge-m3", [QUERY], output_types=["multivector"])
    m3_docs = await encode(server, "tiny/bge-m3", DOCS, output_types=["multivector"])
    m3_multi = from_tensor(m3_query.multivector.values)
    m3 = score_request("tiny/bge-m3", query=None)
    m3.query.CopyFrom(common_pb2.Item(multivector=to_tensor(m3_multi, common_pb2.DTYPE_FLOAT32)))
    want = [maxsim(m3_multi, from_tensor(d.multivector.values)) / len(m3_multi) for d in m3_docs]
    np.testing.assert_allclose(by_index(await stub.Score(m3)), want, atol=1e-5)
    doc_tokens = sum(d.num_tokens for d in docs)
    assert (
        metrics.counter("sie_tokens_processed_total", model="tiny/colbert") - tokens_before
        == doc_tokens
    )


# ---- batching across calls --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny/reranker", "tiny/dense"])
async def test_64_concurrent_score_calls_share_forward_passes(
    server: ServerHandle, model: str
) -> None:
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    metrics = server.running.registry.metrics
    before = metrics.counter("sie_batches_total", model=model, status="ok")
    calls = [
        stub.Score(score_request(model, [DOCS[i % 4], DOCS[(i + 1) % 4]], query=f"query {i}"))
        for i in range(64)
    ]
    responses = await asyncio.gather(*calls)
    passes = metrics.counter("sie_batches_total", model=model, status="ok") - before
    assert all(len(r.scores) == 2 for r in responses)
    assert passes < len(calls), f"{passes} forward passes for {len(calls)} calls"


# ---- errors -----------------------------------------------------------------------------------------


def _bad_multivector() -> score_pb2.ScoreRequest:
    req = score_request("tiny/colbert", query=None)
    req.query.multivector.CopyFrom(
        common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 16], data=b"\x00" * 8)
    )
    return req


def _wrong_dims() -> score_pb2.ScoreRequest:
    req = score_request("tiny/colbert", query=None)
    req.query.multivector.CopyFrom(to_tensor(np.ones((3, 5), np.float32), common_pb2.DTYPE_FLOAT32))
    return req


def _int_multivector() -> score_pb2.ScoreRequest:
    req = score_request("tiny/colbert", query=None)
    req.query.multivector.CopyFrom(to_tensor(np.ones((3, 16), np.int8), common_pb2.DTYPE_INT8))
    return req


def _multivector_for_dense() -> score_pb2.ScoreRequest:
    req = score_request("tiny/bge-m3", query=None, options={"score_mode": "dense"})
    req.query.multivector.CopyFrom(
        to_tensor(np.ones((3, bge_m3.HIDDEN), np.float32), common_pb2.DTYPE_FLOAT32)
    )
    return req


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: score_request("tiny/dense", query=None), "query is required"),
        (lambda: score_request("tiny/dense", query=""), None),  # empty text is a query
        (lambda: score_request("tiny/dense", []), "items must not be empty"),
        (lambda: score_request("tiny/dense", ["d"] * 9), "9 items exceed the limit of 8"),
        (lambda: score_request("tiny/encode-only"), "does not support score (it supports encode)"),
        (
            lambda: score_request("tiny/dense", options={"threshold": 1}),
            "unknown option 'threshold'",
        ),
        (_bad_multivector, "query 0: bad multivector"),
        (_wrong_dims, "query multivector must have shape [tokens, 16], got [3, 5]"),
        (_int_multivector, "a multivector must be float32 or float16"),
        (_multivector_for_dense, "scores with score_mode 'colbert' only"),
    ],
)
async def test_invalid_score_requests(stub: Any, make: Any, fragment: str | None) -> None:
    req = make()
    if fragment is None:
        response = await stub.Score(req)
        assert len(response.scores) == len(req.items)
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (caught.value.details() or "")
    reason, metadata, retry = error_info(caught.value)
    assert reason == "INVALID_INPUT"
    assert metadata == {"model": req.model}
    assert retry is None


async def test_unknown_model_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(score_request("no/such-model"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value)[0] == "MODEL_NOT_FOUND"
