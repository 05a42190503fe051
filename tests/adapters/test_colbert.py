"""ColBERTAdapter against colbert-ai 0.2.22 (``Checkpoint``: ``queryFromText``, ``docFromText``,
``colbert_score``) on a tiny random HF_ColBERT checkpoint.

colbert-ai loads under transformers 5.16 only with the ``post_init()`` shim described in
``tests/tiny_models/colbert.py`` (as shipped it fails with ``AttributeError: 'HF_ColBERT' object
has no attribute 'all_tied_weights_keys'``); ``test_colbert_ai_needs_the_post_init_shim`` pins
that, so the shim goes when a fixed colbert-ai arrives. pylate is not installed (it pins
sentence-transformers==5.3.0 and transformers<=5.3, against this project's pins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import CatalogError, load_catalog
from sie_server.domain import InputItem
from sie_server.engine.warmup import run_inline
from sie_server.tasks.encode import EncodeSettings
from sie_server.tasks.score import ScoreParams, resolve_score

from tests.harness import encoder, load_adapter, make_spec, prepare, run_encode
from tests.tiny_models.colbert import (
    DIM,
    build_tiny_colbert,
    colbert_ai_config,
    colbert_ai_warnings_ignored,
    load_colbert_ai,
    reference_colbert,
    reference_maxsim,
)

QUERY_MAXLEN = 12
DOC_MAXLEN = 24
QUERY = EncodeSettings(output_types=("multivector",), is_query=True)
DOCUMENT = EncodeSettings(output_types=("multivector",))
TEXTS = [
    "short",
    "what is late interaction retrieval",
    "a somewhat longer text about token level embeddings and maxsim scoring",
]
PASSAGES = [
    *TEXTS,
    "Hello, world! (punctuation: dropped.)",
    "late interaction keeps one vector per token; maxsim compares them",
    " ".join(["retrieval"] * 100),  # truncated at doc_maxlen
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_colbert(tmp_path_factory.mktemp("colbert"))


@pytest.fixture(scope="module")
def adapter(folder: Path) -> ModelAdapter:
    spec = make_spec(
        "tiny-colbert",
        "colbert",
        folder,
        {"multivector": DIM},
        max_sequence_length=128,
        load_options={"query_maxlen": QUERY_MAXLEN, "doc_maxlen": DOC_MAXLEN},
    )
    return load_adapter(spec)


@pytest.fixture(scope="module")
def colbert_ai(folder: Path) -> Any:
    return load_colbert_ai(folder, query_maxlen=QUERY_MAXLEN, doc_maxlen=DOC_MAXLEN)


def reference(checkpoint: Any, texts: list[str], *, is_query: bool) -> list[np.ndarray]:
    return reference_colbert(
        Path(checkpoint.colbert_config.checkpoint),
        texts,
        is_query=is_query,
        query_maxlen=QUERY_MAXLEN,
        doc_maxlen=DOC_MAXLEN,
        checkpoint=checkpoint,
    )


def test_queries_match_reference(adapter: ModelAdapter, colbert_ai: Any) -> None:
    outputs = run_encode(adapter, TEXTS, QUERY)
    expected = reference(colbert_ai, TEXTS, is_query=True)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.multivector is not None
        assert out.multivector.dtype == np.float32
        assert out.multivector.flags.c_contiguous
        assert out.multivector.shape == (QUERY_MAXLEN, DIM)
        np.testing.assert_allclose(out.multivector, ref, atol=1e-5)


def test_documents_match_reference(adapter: ModelAdapter, colbert_ai: Any) -> None:
    texts = [*TEXTS, "Hello, world! (punctuation: dropped.)"]
    outputs = run_encode(adapter, texts, DOCUMENT)
    expected = reference(colbert_ai, texts, is_query=False)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.multivector is not None
        assert out.multivector.dtype == np.float32
        assert out.multivector.shape == ref.shape
        np.testing.assert_allclose(out.multivector, ref, atol=1e-5)


def test_batch_padding_does_not_change_results(adapter: ModelAdapter) -> None:
    batched = run_encode(adapter, TEXTS, DOCUMENT)
    for text, out in zip(TEXTS, batched, strict=True):
        (alone,) = run_encode(adapter, [text], DOCUMENT)
        assert alone.multivector is not None
        assert out.multivector is not None
        np.testing.assert_allclose(out.multivector, alone.multivector, atol=1e-5)


def test_token_ids_are_colbert_ais(adapter: ModelAdapter, colbert_ai: Any) -> None:
    # Queries: [CLS] [unused0] ... [SEP], then [MASK] up to query_maxlen, only the text attended.
    ids, mask = colbert_ai.query_tokenizer.tensorize(PASSAGES)
    for tokens, want, attended in zip(prepare(adapter, PASSAGES, QUERY), ids, mask, strict=True):
        assert tokens.input_ids == want.tolist()
        assert tokens.extra.attended == int(attended.sum())
    # Documents: [CLS] [unused1] ... [SEP], cut at doc_maxlen (colbert-ai pads to the longest).
    ids, mask = colbert_ai.doc_tokenizer.tensorize(PASSAGES)
    for tokens, want, attended in zip(prepare(adapter, PASSAGES, DOCUMENT), ids, mask, strict=True):
        assert tokens.input_ids == want[: int(attended.sum())].tolist()


def test_query_is_mask_padded(adapter: ModelAdapter) -> None:
    tokens = prepare(adapter, ["short"], QUERY)[0]
    tok = adapter.tokenizer  # type: ignore[attr-defined]
    marker = tok.convert_tokens_to_ids("[unused0]")
    assert tokens.input_ids[:2] == [tok.cls_token_id, marker]
    assert len(tokens.input_ids) == QUERY_MAXLEN == tokens.cost
    assert tokens.input_ids[4:] == [tok.mask_token_id] * (QUERY_MAXLEN - 4)
    assert not tokens.truncated


def test_document_drops_punctuation_rows(adapter: ModelAdapter) -> None:
    plain, punctuated = run_encode(adapter, ["hello world", "hello, world!"], DOCUMENT)
    assert plain.multivector is not None
    assert punctuated.multivector is not None
    # [CLS] [D] hello world [SEP]: the comma and the exclamation mark leave no rows.
    assert plain.multivector.shape == (5, DIM)
    assert punctuated.multivector.shape == (5, DIM)
    tokens = prepare(adapter, ["hello, world!"], DOCUMENT)[0]
    tok = adapter.tokenizer  # type: ignore[attr-defined]
    assert tokens.input_ids[1] == tok.convert_tokens_to_ids("[unused1]")
    assert len(tokens.input_ids) == 7


def test_long_document_is_truncated(adapter: ModelAdapter, colbert_ai: Any) -> None:
    text = " ".join(["retrieval"] * 100)
    tokens = prepare(adapter, [text], DOCUMENT)[0]
    assert tokens.truncated
    assert len(tokens.input_ids) == DOC_MAXLEN == tokens.cost
    assert tokens.input_ids[-1] == adapter.tokenizer.sep_token_id  # type: ignore[attr-defined]
    (out,) = run_encode(adapter, [text], DOCUMENT)
    (ref,) = reference(colbert_ai, [text], is_query=False)
    assert out.multivector is not None
    assert out.multivector.shape == (DOC_MAXLEN, DIM)
    np.testing.assert_allclose(out.multivector, ref, atol=1e-5)


def test_long_query_is_truncated(adapter: ModelAdapter, colbert_ai: Any) -> None:
    text = " ".join(["retrieval"] * 100)
    tokens = prepare(adapter, [text], QUERY)[0]
    assert tokens.truncated
    assert len(tokens.input_ids) == QUERY_MAXLEN
    (out,) = run_encode(adapter, [text], QUERY)
    (ref,) = reference(colbert_ai, [text], is_query=True)
    assert out.multivector is not None
    np.testing.assert_allclose(out.multivector, ref, atol=1e-5)


# ---- scoring: MaxSim against colbert_score -----------------------------------------------------


def score(adapter: ModelAdapter, query: InputItem, options: dict[str, Any]) -> list[float]:
    import torch

    model = encoder(adapter)
    call = resolve_score(
        model.spec,
        query,
        [InputItem(text=p) for p in PASSAGES],
        ScoreParams(options=options),
        accepted_options=model.score_option_keys(),
        limits=len(PASSAGES),
    )
    with torch.inference_mode():
        scores: list[float] = run_inline(model.score_job(call))
    return scores


@pytest.mark.parametrize("options", [{}, {"score_mode": "colbert"}])
def test_score_matches_colbert_score(
    adapter: ModelAdapter, colbert_ai: Any, options: dict[str, Any]
) -> None:
    query = "what is late interaction retrieval?"
    want = reference_maxsim(colbert_ai, query, PASSAGES)
    assert np.ptp(want) > 0.3, "the passages must score apart for the test to mean something"
    # ColBERT's MaxSim is a sum over the query's rows (BGE-M3 divides by their count).
    np.testing.assert_allclose(score(adapter, InputItem(text=query), options), want, atol=1e-5)


def test_a_query_given_as_colbert_ais_vectors_scores_the_same(
    adapter: ModelAdapter, colbert_ai: Any
) -> None:
    query = "token level embeddings"
    (q,) = reference(colbert_ai, [query], is_query=True)
    got = score(adapter, InputItem(multivector=q), {"score_mode": "colbert"})
    np.testing.assert_allclose(got, reference_maxsim(colbert_ai, query, PASSAGES), atol=1e-5)


def test_colbert_ai_needs_the_post_init_shim(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """colbert-ai 0.2.22 as shipped cannot load under transformers 5: when this fails, a fixed
    colbert-ai arrived and tests/tiny_models/colbert.py can drop its shim."""
    from colbert.modeling.checkpoint import Checkpoint  # type: ignore[import-untyped]
    from colbert.modeling.colbert import ColBERT  # type: ignore[import-untyped]

    monkeypatch.setattr(ColBERT, "loaded_extensions", True, raising=False)  # no C++ build
    config = colbert_ai_config(folder, query_maxlen=QUERY_MAXLEN, doc_maxlen=DOC_MAXLEN)
    with (
        colbert_ai_warnings_ignored(),
        pytest.raises(AttributeError, match="has no attribute 'all_tied_weights_keys'"),
    ):
        Checkpoint(str(folder), colbert_config=config, verbose=0)


def test_rows_are_unit_norm(adapter: ModelAdapter) -> None:
    for settings in (QUERY, DOCUMENT):
        for out in run_encode(adapter, TEXTS, settings):
            assert out.multivector is not None
            norms = np.linalg.norm(out.multivector, axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_a_catalog_entry_with_dense_fails_to_load(folder: Path) -> None:
    spec = make_spec("tiny-colbert-bad", "colbert", folder, {"multivector": DIM, "dense": DIM})
    with pytest.raises(CatalogError, match="cannot produce dense"):
        create_adapter(spec).check_spec()


def test_memory_bytes_and_unload(folder: Path) -> None:
    spec = make_spec("tiny-colbert-2", "colbert", folder, {"multivector": DIM})
    adapter = load_adapter(spec)
    assert adapter.memory_bytes() > 0
    adapter.unload()
    assert adapter.memory_bytes() == 0


def test_catalog_entry_is_valid() -> None:
    import sie_server.catalog as catalog

    folder = Path(catalog.__file__).parent / "models"
    spec = load_catalog([folder])["colbert-ir/colbertv2.0"]
    assert spec.adapter == "colbert"
    assert spec.hf_id == "colbert-ir/colbertv2.0"
    assert spec.outputs["multivector"].dims == 128
    assert spec.outputs["multivector"].similarity == "maxsim"
    assert spec.load_options == {"doc_maxlen": 180, "query_maxlen": 32}
    assert spec.profile(None).output_types == ("multivector",)


def test_linear_weight_from_pytorch_model_bin(folder: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from sie_server.adapters.colbert import load_linear_weight
    from sie_server.errors import ModelLoadFailed

    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    weight = load_linear_weight(str(tmp_path), "tiny")
    torch.testing.assert_close(weight, state["linear.weight"])
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadFailed):
        load_linear_weight(str(tmp_path), "tiny")
