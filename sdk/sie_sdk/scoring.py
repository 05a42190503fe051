"""Client-side MaxSim for multivector (ColBERT-style) embeddings: encode documents once, score often.

``maxsim(query, documents)`` scores one query against many documents and ``maxsim_batch(queries,
documents)`` many queries against many documents. For a query Q (``[q, dim]``) and a document D
(``[t, dim]``) the score is ``sum_i max_j <Q_i, D_j>``: each query token's best dot product over the
document's tokens, summed over the query's tokens (for L2-normalised vectors, as the server's
multivector output is, the dot product is the cosine similarity).

Invariants:

- No Python loop over tokens or over (query, document) pairs. All query tokens are stacked into one
  ``[sum_q, dim]`` matrix and the documents' tokens into one ``[sum_t, dim]`` matrix (no padding, so
  no mask), one matrix product gives every token pair, ``np.maximum.reduceat`` takes the best per
  (document, query token) and ``np.add.reduceat`` sums per (document, query). Documents are taken
  in chunks so that the similarity matrix stays under ``SIMILARITY_BUDGET`` elements; the only
  Python loop is over those chunks.
- Arithmetic is float32 (float16 and integer inputs are promoted to it; if any input is float64
  the whole computation is float64); the per-query sums accumulate in float64, as the server's
  MaxSim does.
- An empty document (0 tokens) scores ``0.0``, and so does any document against an empty query.
  That is what the server's score endpoint answers for the same vectors
  (``sie_server.adapters.similarity.maxsim``), so ranking client-side and server-side agree; it is
  also finite, so the scores stay JSON-safe. (The max over an empty set would be -inf.)
- ``documents`` is a list of 2-D arrays (ragged), one 3-D array ``[num_docs, tokens, dim]``, or
  one 2-D array, read as a single document (as the original SIE SDK does). ``queries`` in
  ``maxsim_batch`` is likewise a list of 2-D arrays or one 3-D array. Every array must share the
  query's ``dim``; a mismatch or a wrong number of dimensions raises ``ValueError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = ["SIMILARITY_BUDGET", "maxsim", "maxsim_batch"]

#: Most elements of one chunk's token-pair similarity matrix (16 MiB of float32).
SIMILARITY_BUDGET = 1 << 22

Array: TypeAlias = npt.NDArray[np.floating]
ArrayLike: TypeAlias = npt.ArrayLike
Multivectors: TypeAlias = Sequence[ArrayLike] | npt.NDArray[np.generic]


def maxsim(query: ArrayLike, documents: Multivectors) -> list[float]:
    """MaxSim of ``query`` (``[num_query_tokens, dim]``) against each document, in order."""
    q = _matrix(query, "query")
    docs = _multivectors(documents, "documents", single_2d=True)
    return [float(score) for score in _scores([q], docs)[0]]


def maxsim_batch(queries: Multivectors, documents: Multivectors) -> npt.NDArray[np.float32]:
    """MaxSim of every query against every document: ``[num_queries, num_documents]`` float32."""
    qs = _multivectors(queries, "queries", single_2d=False)
    docs = _multivectors(documents, "documents", single_2d=False)
    return _scores(qs, docs).astype(np.float32)


# ---- inputs ---------------------------------------------------------------------------------
def _matrix(value: ArrayLike, where: str) -> npt.NDArray[np.generic]:
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{where} must be 2-D [tokens, dim], got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{where} must hold real numbers, got dtype {array.dtype}")
    return array


def _multivectors(
    value: Multivectors, where: str, *, single_2d: bool
) -> list[npt.NDArray[np.generic]]:
    if isinstance(value, np.ndarray):
        if value.ndim == 2 and single_2d:
            return [_matrix(value, where)]
        if value.ndim != 3:
            expect = (
                "a list of 2-D arrays, one 3-D array or one 2-D array"
                if single_2d
                else "a list of 2-D arrays or one 3-D array"
            )
            raise ValueError(f"{where} must be {expect}, got an array of shape {value.shape}")
        return [_matrix(row, f"{where}[{index}]") for index, row in enumerate(value)]
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{where} must be a list of 2-D arrays, got {type(value).__name__}")
    return [_matrix(row, f"{where}[{index}]") for index, row in enumerate(value)]


def _check_dims(arrays: list[npt.NDArray[np.generic]], dim: int, where: str) -> None:
    for index, array in enumerate(arrays):
        if array.shape[1] != dim:
            raise ValueError(
                f"{where}[{index}] has dim {array.shape[1]}, expected the query's dim {dim}"
            )


# ---- computation ----------------------------------------------------------------------------
def _scores(
    queries: list[npt.NDArray[np.generic]], documents: list[npt.NDArray[np.generic]]
) -> npt.NDArray[np.float64]:
    """``[len(queries), len(documents)]`` MaxSim scores, summed in float64."""
    out = np.zeros((len(queries), len(documents)), dtype=np.float64)
    if not queries:
        return out
    dim = queries[0].shape[1]
    _check_dims(queries, dim, "queries")
    _check_dims(documents, dim, "documents")
    wide = any(a.dtype.kind == "f" and a.dtype.itemsize > 4 for a in (*queries, *documents))
    dtype = np.dtype(np.float64 if wide else np.float32)

    q_lengths = np.array([q.shape[0] for q in queries], dtype=np.int64)
    live_q = np.flatnonzero(q_lengths)
    d_lengths = np.array([d.shape[0] for d in documents], dtype=np.int64)
    live_d = np.flatnonzero(d_lengths)
    if live_q.size == 0 or live_d.size == 0:
        return out  # empty queries and empty documents score 0.0

    q_tokens = _stack([queries[i] for i in live_q], dtype)  # [sum_q, dim]
    q_starts = _starts(q_lengths[live_q])
    rows = max(1, SIMILARITY_BUDGET // q_tokens.shape[0])
    for chunk in _chunks(d_lengths[live_d], rows):
        picked = live_d[chunk]
        d_tokens = _stack([documents[i] for i in picked], dtype)  # [chunk_t, dim]
        similarity = d_tokens @ q_tokens.T  # [chunk_t, sum_q]
        best = np.maximum.reduceat(similarity, _starts(d_lengths[picked]), axis=0)  # [n, sum_q]
        per_query = np.add.reduceat(best, q_starts, axis=1, dtype=np.float64)  # [n, live queries]
        out[np.ix_(live_q, picked)] = per_query.T
    return out


def _stack(arrays: list[npt.NDArray[np.generic]], dtype: np.dtype[np.generic]) -> Array:
    stacked: Array = np.concatenate(arrays, axis=0, dtype=dtype, casting="unsafe")
    return stacked


def _starts(lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Offsets of consecutive segments of these (non-zero) lengths."""
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _chunks(lengths: npt.NDArray[np.int64], rows: int) -> Iterator[slice]:
    """Consecutive runs of documents of at most ``rows`` tokens together (at least one each)."""
    ends = np.cumsum(lengths)
    start, base = 0, 0
    while start < lengths.size:
        stop = max(start + 1, int(np.searchsorted(ends, base + rows, side="right")))
        yield slice(start, stop)
        base, start = int(ends[stop - 1]), stop
