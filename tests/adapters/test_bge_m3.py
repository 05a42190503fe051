"""BGE-M3 adapter against an independent FlagEmbedding-style reference on a tiny random model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.bge_m3 import BGEM3Adapter
from sie_server.adapters.hf import parameter_bytes
from sie_server.catalog import BUILTIN_CATALOG_DIR, load_catalog
from sie_server.domain import EncodeOutput, InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks.encode import EncodeParams, EncodeSettings, resolve_encode

from tests.harness import load_adapter, make_spec, prepare, run_encode
from tests.tiny_models.bge_m3 import HIDDEN, build_tiny_bge_m3, reference_bge_m3

MAX_LEN = 128
TEXTS = [
    "Short one.",
    "Hello hello hello world: repeated tokens keep their max weight.",
    "A medium length text about vector search, latency and tokenization, with numbers 3.14 "
    "and punctuation; it should be several times longer than the first one in tokens.",
    "Unknown characters € ¤ map to the unk token, which is dropped from lexical weights.",
    "x",
]
ALL = ("dense", "sparse", "multivector")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bge_m3(tmp_path_factory.mktemp("bge-m3"))


@pytest.fixture(scope="module")
def adapter(folder: Path) -> ModelAdapter:
    spec = make_spec(
        "tiny/bge-m3",
        "bge_m3",
        folder,
        {"dense": HIDDEN, "sparse": 1000, "multivector": HIDDEN},
        max_sequence_length=MAX_LEN,
    )
    return load_adapter(spec)


@pytest.fixture(scope="module")
def reference(folder: Path) -> list[dict[str, Any]]:
    return reference_bge_m3(folder, TEXTS, MAX_LEN)


def assert_sparse_equal(out: EncodeOutput, expected: dict[int, float]) -> None:
    assert out.sparse is not None
    assert out.sparse.indices.dtype == np.int32
    assert out.sparse.values.dtype == np.float32
    assert np.all(np.diff(out.sparse.indices) > 0), "indices must ascend"
    want = sorted(expected)
    np.testing.assert_array_equal(out.sparse.indices, want)
    np.testing.assert_allclose(out.sparse.values, [expected[i] for i in want], atol=1e-5)


def test_all_outputs_in_one_batch_match_reference(
    adapter: ModelAdapter, reference: list[dict[str, Any]]
) -> None:
    # The texts have different lengths, so every item but the longest is padded.
    outputs = run_encode(adapter, TEXTS, EncodeSettings(output_types=ALL))
    assert len(outputs) == len(TEXTS)
    for out, ref in zip(outputs, reference, strict=True):
        assert out.dense is not None
        assert out.dense.dtype == np.float32
        assert out.dense.flags.c_contiguous
        np.testing.assert_allclose(out.dense, ref["dense"], atol=1e-5)
        assert_sparse_equal(out, ref["sparse"])
        assert out.multivector is not None
        assert out.multivector.dtype == np.float32
        assert out.multivector.flags.c_contiguous
        assert out.multivector.shape == (ref["num_tokens"] - 1, HIDDEN)
        np.testing.assert_allclose(out.multivector, ref["multivector"], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(out.multivector, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ALL)
def test_single_output_type_only_fills_that_output(
    adapter: ModelAdapter, reference: list[dict[str, Any]], kind: str
) -> None:
    outputs = run_encode(adapter, TEXTS, EncodeSettings(output_types=(kind,)))
    for out, ref in zip(outputs, reference, strict=True):
        filled = {k for k in ALL if getattr(out, k) is not None}
        assert filled == {kind}
        if kind == "sparse":
            assert_sparse_equal(out, ref["sparse"])
        else:
            np.testing.assert_allclose(getattr(out, kind), ref[kind], atol=1e-5)


def test_sparse_drops_special_tokens_and_keeps_max_per_token(
    adapter: ModelAdapter, folder: Path
) -> None:
    tokenizer = adapter.tokenizer  # type: ignore[attr-defined]
    text = TEXTS[3]
    ids = prepare(adapter, [text], EncodeSettings(output_types=("sparse",)))[0].input_ids
    assert tokenizer.unk_token_id in ids, "the test text must contain an unknown token"
    assert len(set(ids)) < len(ids), "the test text must repeat a token"
    (out,) = run_encode(adapter, [text], EncodeSettings(output_types=("sparse",)))
    assert out.sparse is not None
    special = {
        tokenizer.cls_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    }
    assert not special & set(out.sparse.indices.tolist())
    assert set(out.sparse.indices.tolist()) <= set(ids)
    assert np.all(out.sparse.values > 0)


def test_batching_does_not_change_results(adapter: ModelAdapter) -> None:
    settings = EncodeSettings(output_types=ALL)
    batched = run_encode(adapter, TEXTS, settings)
    for text, together in zip(TEXTS, batched, strict=True):
        (alone,) = run_encode(adapter, [text], settings)
        np.testing.assert_allclose(together.dense, alone.dense, atol=1e-5)  # type: ignore[arg-type]
        np.testing.assert_allclose(together.multivector, alone.multivector, atol=1e-5)  # type: ignore[arg-type]
        assert together.sparse is not None
        assert alone.sparse is not None
        np.testing.assert_array_equal(together.sparse.indices, alone.sparse.indices)
        np.testing.assert_allclose(together.sparse.values, alone.sparse.values, atol=1e-5)


def test_truncation(folder: Path) -> None:
    spec = make_spec(
        "tiny/bge-m3-short",
        "bge_m3",
        folder,
        {"dense": HIDDEN, "sparse": 1000, "multivector": HIDDEN},
        max_sequence_length=8,
    )
    short = load_adapter(spec)
    long_text = TEXTS[2]
    settings = EncodeSettings(output_types=ALL)
    tokens = prepare(short, [long_text, "x"], settings)
    assert tokens[0].truncated
    assert tokens[0].cost == 8
    assert tokens[0].input_ids[0] == 0
    assert tokens[0].input_ids[-1] == 2  # </s> kept after truncation
    assert not tokens[1].truncated
    (out,) = run_encode(short, [long_text], settings)
    assert out.multivector is not None
    assert out.multivector.shape == (7, HIDDEN)
    (ref,) = reference_bge_m3(folder, [long_text], 8)
    np.testing.assert_allclose(out.dense, ref["dense"], atol=1e-5)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.multivector, ref["multivector"], atol=1e-5)
    assert_sparse_equal(out, ref["sparse"])


def test_unknown_output_type_is_refused_before_any_work(folder: Path) -> None:
    spec = make_spec("tiny/bge-m3", "bge_m3", folder, {"dense": HIDDEN, "sparse": 1000})
    with pytest.raises(InvalidInput, match="colbert"):
        resolve_encode(
            spec,
            [InputItem(text="x")],
            EncodeParams(output_types=("dense", "colbert")),
            accepted_options=(),
            max_items=4,
        )
    with pytest.raises(InvalidInput, match="does not produce multivector"):
        resolve_encode(
            spec,
            [InputItem(text="x")],
            EncodeParams(output_types=("multivector",)),
            accepted_options=(),
            max_items=4,
        )


def test_missing_head_file_fails_load(folder: Path, tmp_path: Path) -> None:
    partial = tmp_path / "no-heads"
    partial.mkdir()
    for f in folder.iterdir():
        if f.name != "sparse_linear.pt":
            (partial / f.name).write_bytes(f.read_bytes())
    spec = make_spec("tiny/bge-m3-partial", "bge_m3", partial, {"dense": HIDDEN})
    with pytest.raises(FileNotFoundError, match=r"sparse_linear\.pt"):
        load_adapter(spec)


def test_memory_and_unload(folder: Path) -> None:
    spec = make_spec("tiny/bge-m3-mem", "bge_m3", folder, {"dense": HIDDEN})
    local = load_adapter(spec)
    heads = (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN + 1)  # colbert + sparse linear, float32
    model_bytes = parameter_bytes(local.model)  # type: ignore[attr-defined]
    assert local.memory_bytes() == model_bytes + 4 * heads
    local.unload()
    assert local.memory_bytes() == 0


def test_catalog_entry() -> None:
    spec = load_catalog([BUILTIN_CATALOG_DIR])["BAAI/bge-m3"]
    assert spec.adapter == "bge_m3"
    assert spec.hf_id == "BAAI/bge-m3"
    assert spec.max_sequence_length == 8192
    assert {k: (o.dims, o.similarity) for k, o in spec.outputs.items()} == {
        "dense": (1024, "cosine"),
        "sparse": (250002, "dot"),
        "multivector": (1024, "maxsim"),
    }
    assert spec.profile(None).output_types == ("dense",)
    assert spec.profile("sparse").output_types == ("sparse",)
    assert spec.profile("multivector").output_types == ("multivector",)
    assert spec.profile("all").output_types == ALL
    assert set(spec.outputs) <= BGEM3Adapter.output_types
