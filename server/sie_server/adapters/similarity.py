"""Bi-encoder similarity between a query's and an item's encode outputs (float32).

* ``dense``: cosine (vectors normalized here, whatever the model did), or a plain dot product
  when the catalog declares ``similarity: dot``.
* ``sparse``: the dot product over shared token ids (BGE-M3's lexical matching score).
* ``colbert``: MaxSim, the sum over query tokens of the best dot product with any item token;
  divided by the query's token count when ``maxsim_mean`` (BGE-M3's ``colbert_score``).
* ``hybrid``: the weighted sum of the above, as SIE defines it (weights are not renormalized).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from sie_server.domain import F32, EncodeOutput, SparseOutput
from sie_server.errors import SIEServerError

T = TypeVar("T")


def score_pair(
    query: EncodeOutput,
    item: EncodeOutput,
    mode: str,
    weights: Mapping[str, float],
    *,
    dense_similarity: str = "cosine",
    maxsim_mean: bool = False,
) -> float:
    def one(kind: str) -> float:
        if kind == "dense":
            return dense_score(_need(query.dense, kind), _need(item.dense, kind), dense_similarity)
        if kind == "sparse":
            return sparse_dot(_need(query.sparse, kind), _need(item.sparse, kind))
        return maxsim(_need(query.multivector, kind), _need(item.multivector, kind), maxsim_mean)

    if mode != "hybrid":
        return one(mode)
    return float(sum(weight * one(kind) for kind, weight in weights.items() if weight > 0))


def dense_score(query: F32, item: F32, similarity: str) -> float:
    if similarity == "dot":
        return float(np.dot(query, item))
    norms = float(np.linalg.norm(query)) * float(np.linalg.norm(item))
    return float(np.dot(query, item) / norms) if norms > 0 else 0.0


def sparse_dot(query: SparseOutput, item: SparseOutput) -> float:
    # Both index arrays ascend and hold unique ids.
    _, q_at, i_at = np.intersect1d(
        query.indices, item.indices, assume_unique=True, return_indices=True
    )
    return float(np.dot(query.values[q_at].astype(np.float64), item.values[i_at]))


def maxsim(query: F32, item: F32, mean: bool) -> float:
    if query.shape[0] == 0 or item.shape[0] == 0:
        return 0.0
    best = (query @ item.T).max(axis=1)
    total = float(best.sum(dtype=np.float64))
    return total / query.shape[0] if mean else total


def _need(value: T | None, kind: str) -> T:
    if value is None:
        raise SIEServerError(f"adapter produced no {kind} output to score with")
    return value
