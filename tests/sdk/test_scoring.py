"""sie_sdk.scoring: MaxSim against a plain double-loop reference for ragged lists, 3-D arrays,
single 2-D documents and batches; chunking; empty inputs; float16 promotion; input errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from sie_sdk import scoring
from sie_sdk.scoring import maxsim, maxsim_batch

DIM = 8


def reference(query: npt.NDArray[np.floating], doc: npt.NDArray[np.floating]) -> float:
    """sum over query tokens of the best dot product over the document's tokens (0.0 if empty)."""
    if len(doc) == 0:
        return 0.0
    total = 0.0
    for q in query.astype(np.float64):
        total += max(float(np.dot(q, d)) for d in doc.astype(np.float64))
    return total


def vectors(rng: np.random.Generator, *lengths: int) -> list[npt.NDArray[np.float32]]:
    out = []
    for length in lengths:
        v = rng.standard_normal((length, DIM)).astype(np.float32)
        out.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6))
    return out


def references(
    queries: Sequence[npt.NDArray[np.floating]], docs: Sequence[npt.NDArray[np.floating]]
) -> npt.NDArray[np.float64]:
    return np.array([[reference(q, d) for d in docs] for q in queries])


def test_hand_computed_example() -> None:
    query = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    doc1 = np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    doc2 = np.array([[0.0, 1.0]], dtype=np.float32)
    assert maxsim(query, [doc1, doc2]) == pytest.approx([1.5, 1.0])


def test_ragged_documents_match_the_reference() -> None:
    rng = np.random.default_rng(1)
    (query,) = vectors(rng, 5)
    docs = vectors(rng, 3, 11, 1, 7, 2)
    scores = maxsim(query, docs)
    assert isinstance(scores, list)
    assert all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(references([query], docs)[0], rel=1e-5, abs=1e-5)


def test_unnormalised_and_negative_similarities() -> None:
    # The max must pick the largest dot product even when all are negative.
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    doc = np.array([[-3.0, 0.0], [-0.5, 9.0], [-2.0, 1.0]], dtype=np.float32)
    assert maxsim(query, [doc]) == pytest.approx([-0.5])


def test_three_d_documents_equal_the_list_form() -> None:
    rng = np.random.default_rng(2)
    (query,) = vectors(rng, 4)
    docs = vectors(rng, 6, 6, 6)
    stacked = np.stack(docs)
    assert maxsim(query, stacked) == pytest.approx(maxsim(query, docs), rel=1e-6)
    assert maxsim(query, stacked) == pytest.approx(references([query], docs)[0], rel=1e-5)


def test_a_two_d_array_is_one_document() -> None:
    rng = np.random.default_rng(3)
    query, doc = vectors(rng, 3, 5)
    scores = maxsim(query, doc)
    assert len(scores) == 1
    assert scores[0] == pytest.approx(reference(query, doc), rel=1e-5)


def test_batch_matches_the_reference() -> None:
    rng = np.random.default_rng(4)
    queries = vectors(rng, 2, 9, 4)
    docs = vectors(rng, 5, 1, 13, 3)
    scores = maxsim_batch(queries, docs)
    assert scores.shape == (3, 4)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, references(queries, docs), rtol=1e-5, atol=1e-5)
    # One row of the batch is maxsim for that query.
    np.testing.assert_allclose(scores[1], maxsim(queries[1], docs), rtol=1e-6)


def test_batch_accepts_three_d_arrays() -> None:
    rng = np.random.default_rng(5)
    queries = np.stack(vectors(rng, 3, 3))
    docs = np.stack(vectors(rng, 4, 4, 4))
    np.testing.assert_allclose(
        maxsim_batch(queries, docs), references(list(queries), list(docs)), rtol=1e-5, atol=1e-5
    )


def test_chunked_documents_give_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    queries = vectors(rng, 3, 2)
    docs = vectors(rng, 4, 0, 9, 1, 6, 2)
    whole = maxsim_batch(queries, docs)
    # 5 query tokens: a budget of 10 similarity elements forces chunks of at most 2 doc tokens,
    # and the 9- and 6-token documents exceed it alone (one document per chunk at least).
    monkeypatch.setattr(scoring, "SIMILARITY_BUDGET", 10)
    chunked = maxsim_batch(queries, docs)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked, references(queries, docs), rtol=1e-5, atol=1e-5)


def test_empty_documents_and_queries_score_zero() -> None:
    rng = np.random.default_rng(7)
    query, doc = vectors(rng, 3, 4)
    empty = np.zeros((0, DIM), dtype=np.float32)
    scores = maxsim(query, [doc, empty, doc])
    assert scores[1] == 0.0
    assert scores[0] == scores[2] == pytest.approx(reference(query, doc), rel=1e-5)
    assert maxsim(empty, [doc, empty]) == [0.0, 0.0]
    assert maxsim(query, []) == []
    batch = maxsim_batch([query, empty], [empty, doc])
    assert batch[0, 0] == 0.0
    assert batch[1].tolist() == [0.0, 0.0]
    assert batch[0, 1] == pytest.approx(reference(query, doc), rel=1e-5)
    assert maxsim_batch([], [doc]).shape == (0, 1)


def test_float16_is_computed_in_float32() -> None:
    # 300 * 300 = 90000 overflows float16 (max 65504) but not float32.
    query = np.array([[300.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    doc = np.array([[300.0, 0.0], [0.0, 2.0]], dtype=np.float16)
    assert maxsim(query, [doc]) == [90002.0]
    batch = maxsim_batch([query], [doc.astype(np.float32)])
    assert batch.dtype == np.float32
    assert batch[0, 0] == 90002.0


def test_float64_inputs_keep_their_precision() -> None:
    query = np.array([[1.0 + 2**-40]], dtype=np.float64)
    doc = np.array([[1.0]], dtype=np.float64)
    assert maxsim(query, [doc]) == [1.0 + 2**-40]


def test_lists_of_lists_are_accepted() -> None:
    assert maxsim([[1, 0], [0, 1]], [[[2, 0]], [[0, 3], [1, 1]]]) == [2.0, 4.0]


@pytest.mark.parametrize(
    ("query", "documents", "message"),
    [
        (np.ones(DIM), [np.ones((2, DIM))], r"query must be 2-D \[tokens, dim\], got shape \(8,\)"),
        (np.ones((1, 2, DIM)), [np.ones((2, DIM))], "query must be 2-D"),
        (np.ones((2, DIM)), [np.ones((2, DIM)), np.ones((2, 4))], r"documents\[1\] has dim 4, "),
        (np.ones((2, DIM)), np.ones((2, 3, 4)), r"documents\[0\] has dim 4, expected .* 8"),
        (np.ones((2, DIM)), [np.ones(DIM)], r"documents\[0\] must be 2-D"),
        (np.ones((2, DIM)), np.ones((1, 2, 3, DIM)), "got an array of shape"),
        (np.ones((2, DIM)), "not arrays", "documents must be a list of 2-D arrays"),
        (np.array([["a", "b"]]), [np.ones((1, 2))], "query must hold real numbers"),
    ],
)
def test_maxsim_errors(query: object, documents: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        maxsim(query, documents)  # type: ignore[arg-type]


def test_batch_errors() -> None:
    with pytest.raises(ValueError, match=r"queries\[1\] has dim 4"):
        maxsim_batch([np.ones((1, DIM)), np.ones((1, 4))], [np.ones((1, DIM))])
    with pytest.raises(ValueError, match=r"documents\[0\] has dim 4"):
        maxsim_batch([np.ones((1, DIM))], [np.ones((1, 4))])
    # A 2-D array is not a batch of queries (ambiguous): maxsim_batch wants a list or 3-D.
    with pytest.raises(
        ValueError,
        match="queries must be a list of 2-D arrays or one 3-D array, got an array of shape",
    ):
        maxsim_batch(np.ones((2, DIM)), [np.ones((1, DIM))])
