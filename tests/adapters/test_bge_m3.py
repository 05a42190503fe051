"""BGE-M3 adapter against FlagEmbedding 1.4.2 (``BGEM3FlagModel``, CPU, float32) on a tiny
random checkpoint: encode outputs against ``encode``, and scores (``score_job`` through
``run_inline``) against ``compute_score``.

On scores: FlagEmbedding's ``colbert+sparse+dense`` is ``sum(w * score) / sum(w)``; SIE's
hybrid is the plain weighted sum. With SIE's default weights (dense .4, sparse .2, colbert .4,
summing to 1) the two agree; custom weights are checked against the weighted sum of
FlagEmbedding's per-mode scores. The query is encoded with ``is_query=True``, which for BGE-M3
without a query template is the same text: FlagEmbedding's ``compute_score`` applies no
instruction either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.bge_m3 import BGEM3Adapter
from sie_server.adapters.hf import parameter_bytes
from sie_server.catalog import BUILTIN_CATALOG_DIR, load_catalog
from sie_server.domain import EncodeOutput, InputItem
from sie_server.engine.warmup import run_inline
from sie_server.errors import InvalidInput
from sie_server.tasks.encode import EncodeParams, EncodeSettings, resolve_encode
from sie_server.tasks.score import ScoreParams, resolve_score

from tests.harness import encoder, load_adapter, make_spec, prepare, run_encode
from tests.tiny_models.bge_m3 import (
    FLAG_MODES,
    HIDDEN,
    build_tiny_bge_m3,
    flag_model,
    reference_bge_m3,
    reference_scores,
)

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
QUERY = "vector search latency and tokenization of short queries"
PASSAGES = [
    *TEXTS,
    "Latency of vector search grows with the number of queries.",
    "Tokenization splits short queries into tokens.",
]


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
def flag(folder: Path) -> Any:
    return flag_model(folder, MAX_LEN)


@pytest.fixture(scope="module")
def reference(folder: Path, flag: Any) -> list[dict[str, Any]]:
    return reference_bge_m3(folder, TEXTS, MAX_LEN, flag)


@pytest.fixture(scope="module")
def flag_scores(flag: Any) -> dict[str, list[float]]:
    return reference_scores(flag, QUERY, PASSAGES, MAX_LEN)


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
    adapter: ModelAdapter, reference: list[dict[str, Any]]
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
    assert_sparse_equal(out, reference[3]["sparse"])


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


# ---- scoring (bi-encoder) against compute_score ---------------------------------------------


def score(adapter: ModelAdapter, options: Mapping[str, Any]) -> list[float]:
    """SIE's score of QUERY against PASSAGES: resolve, ``score_job``, run inline (as warm-up)."""
    import torch

    model = encoder(adapter)
    call = resolve_score(
        model.spec,
        InputItem(text=QUERY),
        [InputItem(text=p) for p in PASSAGES],
        ScoreParams(options=dict(options)),
        accepted_options=model.score_option_keys(),
        limits=len(PASSAGES),
    )
    with torch.inference_mode():
        scores: list[float] = run_inline(model.score_job(call))
    return scores


@pytest.mark.parametrize(
    ("options", "mode"),
    [
        ({}, "dense"),  # the default profile's first output
        ({"score_mode": "dense"}, "dense"),
        ({"score_mode": "sparse"}, "sparse"),
        ({"score_mode": "colbert"}, "colbert"),
    ],
)
def test_score_modes_match_flag_embedding(
    adapter: ModelAdapter,
    flag_scores: dict[str, list[float]],
    options: dict[str, Any],
    mode: str,
) -> None:
    want = flag_scores[mode]
    assert np.ptp(want) > 0.05, "the passages must score apart for the test to mean something"
    np.testing.assert_allclose(score(adapter, options), want, atol=1e-5)


def test_default_hybrid_matches_flag_embedding_ensemble(
    adapter: ModelAdapter, flag_scores: dict[str, list[float]]
) -> None:
    # reference_scores asks for FlagEmbedding's ensemble with SIE's default weights .4/.2/.4.
    np.testing.assert_allclose(
        score(adapter, {"score_mode": "hybrid"}), flag_scores["colbert+sparse+dense"], atol=1e-5
    )


@pytest.mark.parametrize(
    ("given", "weights"),
    [
        (
            {"dense": 0.7, "sparse": 0.5, "colbert": 0.3},
            {"dense": 0.7, "sparse": 0.5, "colbert": 0.3},
        ),
        ({"sparse": 1.0}, {"dense": 0.4, "sparse": 1.0, "colbert": 0.4}),  # overrides one default
        ({"colbert": 0.0}, {"dense": 0.4, "sparse": 0.2, "colbert": 0.0}),  # skips an output
    ],
)
def test_custom_hybrid_weights_are_a_plain_weighted_sum(
    adapter: ModelAdapter,
    flag: Any,
    flag_scores: dict[str, list[float]],
    given: dict[str, float],
    weights: dict[str, float],
) -> None:
    got = score(adapter, {"score_mode": "hybrid", "score_weights": given})
    want = sum(w * np.asarray(flag_scores[mode]) for mode, w in weights.items())
    np.testing.assert_allclose(got, want, atol=1e-5)
    # FlagEmbedding's own ensemble with the same weights divides by their sum; SIE does not.
    flag_weights = [weights[mode] for mode in FLAG_MODES]
    ensemble = reference_scores(flag, QUERY, PASSAGES, MAX_LEN, flag_weights)
    np.testing.assert_allclose(
        got, sum(flag_weights) * np.asarray(ensemble["colbert+sparse+dense"]), atol=1e-5
    )


def test_the_query_side_is_the_plain_text(adapter: ModelAdapter) -> None:
    as_query = prepare(adapter, [QUERY], EncodeSettings(output_types=ALL, is_query=True))
    as_document = prepare(adapter, [QUERY], EncodeSettings(output_types=ALL))
    assert as_query[0].input_ids == as_document[0].input_ids
    tokenizer = adapter.tokenizer  # type: ignore[attr-defined]
    assert as_query[0].input_ids == tokenizer(QUERY)["input_ids"]


def test_truncation(folder: Path, flag: Any) -> None:
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
    (ref,) = reference_bge_m3(folder, [long_text], 8, flag)
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
            limits=4,
        )
    with pytest.raises(InvalidInput, match="does not produce multivector"):
        resolve_encode(
            spec,
            [InputItem(text="x")],
            EncodeParams(output_types=("multivector",)),
            accepted_options=(),
            limits=4,
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
