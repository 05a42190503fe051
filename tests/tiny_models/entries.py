"""Catalog entries for the tiny models, one line each in the tests that serve them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tiny_models import bge_m3, dense

DENSE_OUTPUTS = {"dense": {"dims": dense.HIDDEN}}
BGE_M3_OUTPUTS = {
    "dense": {"dims": bge_m3.HIDDEN},
    "sparse": {"dims": 1000, "similarity": "dot"},
    "multivector": {"dims": bge_m3.HIDDEN, "similarity": "maxsim"},
}
SCORE_OUTPUTS: dict[str, Any] = {"score": {}}
JSON_OUTPUTS: dict[str, Any] = {"json": {}}


def entry(
    name: str,
    adapter: str,
    weights: Path,
    outputs: dict[str, Any],
    max_sequence_length: int = 128,
    **fields: Any,
) -> dict[str, Any]:
    """A catalog entry serving ``weights`` (a folder the test built) with ``adapter``."""
    return {
        "name": name,
        "adapter": adapter,
        "weights_path": str(weights),
        "max_sequence_length": max_sequence_length,
        "outputs": outputs,
        **fields,
    }
