"""SPLADE adapter against sentence-transformers' SparseEncoder on a tiny random BERT MLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.registry import create_adapter
from sie_server.adapters.splade import SpladeAdapter
from sie_server.catalog import BUILTIN_CATALOG_DIR, CatalogError, load_catalog
from sie_server.domain import EncodeOutput
from sie_server.tasks.encode import EncodeSettings

from tests.harness import load_adapter, make_spec, prepare, run_encode
from tests.tiny_models.splade import build_tiny_splade, reference_splade

MAX_LEN = 128
VOCAB = 30522
SPARSE = EncodeSettings(output_types=("sparse",))
TEXTS = [
    "Short one.",
    "Sparse retrieval expands a query into weighted vocabulary terms.",
    "A medium length text about vector search, latency and tokenization, with numbers 3.14 "
    "and punctuation; it should be several times longer than the first one in tokens.",
    "x",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_splade(tmp_path_factory.mktemp("splade"))


@pytest.fixture(scope="module")
def adapter(folder: Path) -> ModelAdapter:
    spec = make_spec(
        "tiny/splade", "splade", folder, {"sparse": VOCAB}, max_sequence_length=MAX_LEN
    )
    return load_adapter(spec)


def assert_sparse_equal(out: EncodeOutput, expected: dict[int, float]) -> None:
    assert out.sparse is not None
    assert out.sparse.indices.dtype == np.int32
    assert out.sparse.values.dtype == np.float32
    assert out.sparse.indices.flags.c_contiguous
    assert out.sparse.values.flags.c_contiguous
    assert np.all(np.diff(out.sparse.indices) > 0), "indices must ascend"
    want = sorted(expected)
    np.testing.assert_array_equal(out.sparse.indices, want)
    np.testing.assert_allclose(out.sparse.values, [expected[i] for i in want], atol=1e-5)


def test_batch_matches_sparse_encoder(adapter: ModelAdapter, folder: Path) -> None:
    # Different lengths in one batch: padding must not add or change weights.
    outputs = run_encode(adapter, TEXTS, SPARSE)
    reference = reference_splade(folder, TEXTS, MAX_LEN)
    for out, ref in zip(outputs, reference, strict=True):
        assert out.dense is None
        assert out.multivector is None
        assert ref, "the tiny model should give some nonzero weights"
        assert len(ref) < VOCAB, "and some zero ones"
        assert_sparse_equal(out, ref)


def test_truncation(folder: Path) -> None:
    spec = make_spec(
        "tiny/splade-short", "splade", folder, {"sparse": VOCAB}, max_sequence_length=8
    )
    short = load_adapter(spec)
    tokens = prepare(short, [TEXTS[2], "x"], SPARSE)
    assert tokens[0].truncated
    assert tokens[0].cost == 8
    assert tokens[0].input_ids[-1] == short.tokenizer.sep_token_id  # type: ignore[attr-defined]
    assert not tokens[1].truncated
    (out,) = run_encode(short, [TEXTS[2]], SPARSE)
    (ref,) = reference_splade(folder, [TEXTS[2]], 8)
    assert_sparse_equal(out, ref)


def test_a_catalog_entry_with_outputs_splade_lacks_fails_to_load(folder: Path) -> None:
    for kind in ("dense", "multivector"):
        spec = make_spec("tiny/splade-bad", "splade", folder, {"sparse": VOCAB, kind: 8})
        with pytest.raises(CatalogError, match=f"cannot produce {kind}"):
            create_adapter(spec).check_spec()


def test_unload(folder: Path) -> None:
    local = load_adapter(make_spec("tiny/splade-mem", "splade", folder, {"sparse": VOCAB}))
    assert local.memory_bytes() > 0
    local.unload()
    assert local.memory_bytes() == 0


def test_catalog_entry() -> None:
    spec = load_catalog([BUILTIN_CATALOG_DIR])["naver/splade-cocondenser-ensembledistil"]
    assert spec.adapter == "splade"
    assert spec.max_sequence_length == 512
    assert {k: (o.dims, o.similarity) for k, o in spec.outputs.items()} == {
        "sparse": (VOCAB, "dot")
    }
    assert spec.profile(None).output_types == ("sparse",)
    assert set(spec.outputs) <= SpladeAdapter.output_types
