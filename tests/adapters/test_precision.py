"""Reduced precision: every family loads and runs in bfloat16 and float16 (the dtypes CUDA
placements pick) and stays close to its float32 outputs; results always come back float32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.tasks.encode import EncodeSettings

from tests.harness import load_adapter, make_spec, run_encode
from tests.tiny_models import bge_m3, colbert, dense

TEXTS = ["Hello, world!", "A somewhat longer sentence about batching and padding."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    return {
        "dense": dense.build_tiny_dense(root / "dense"),
        "bge_m3": bge_m3.build_tiny_bge_m3(root / "bge"),
        "colbert": colbert.build_tiny_colbert(root / "colbert"),
    }


CASES: list[tuple[str, dict[str, int], tuple[str, ...]]] = [
    ("dense", {"dense": dense.HIDDEN}, ("dense",)),
    ("bge_m3", {"dense": bge_m3.HIDDEN, "multivector": bge_m3.HIDDEN}, ("dense", "multivector")),
    ("colbert", {"multivector": 16}, ("multivector",)),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(("family", "outputs", "types"), CASES)
def test_reduced_precision_is_close_to_float32(
    folders: dict[str, Path],
    family: str,
    outputs: dict[str, int],
    types: tuple[str, ...],
    dtype: str,
) -> None:
    spec = make_spec(f"tiny/{family}", family, folders[family], outputs)
    settings = EncodeSettings(output_types=types)
    full = run_encode(load_adapter(spec, dtype="float32"), TEXTS, settings)
    low = run_encode(load_adapter(spec, dtype=dtype), TEXTS, settings)
    for a, b in zip(full, low, strict=True):
        for kind in types:
            x: Any = getattr(a, kind)
            y: Any = getattr(b, kind)
            assert y.dtype == np.float32
            assert y.shape == x.shape
            cosine = np.sum(x * y, axis=-1) / (
                np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
            )
            assert float(np.min(cosine)) > 0.99
