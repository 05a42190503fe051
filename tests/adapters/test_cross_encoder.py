"""Cross-encoder rerankers against sentence-transformers' ``CrossEncoder.predict`` on tiny random
checkpoints (BERT and DeBERTa-v2), driven through ``score_job`` + ``run_inline``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sie_server.adapters.base import PairScorer, tasks_of
from sie_server.adapters.cross_encoder import CrossEncoderAdapter
from sie_server.adapters.hf import parameter_bytes
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import BUILTIN_CATALOG_DIR, CatalogError, ModelSpec, load_catalog
from sie_server.catalog.spec import parse_spec
from sie_server.domain import ImageData, InputItem, TokenizedText
from sie_server.engine.warmup import QUERY, TEXT, job_for, run_inline, sample_calls, warm_up
from sie_server.errors import InputTooLong, InvalidInput
from sie_server.tasks.score import ScoreParams, resolve_score
from transformers import AutoTokenizer

from tests.harness import load_adapter
from tests.tiny_models.classifiers import (
    DEBERTA_JIT_WARNING,
    build_bert_classifier,
    build_deberta_classifier,
    cross_encoder_activation,
    cross_encoder_scores,
    save_as_cross_encoder,
)

pytestmark = pytest.mark.filterwarnings(DEBERTA_JIT_WARNING)


MAX_LEN = 128
IDENTITY = "torch.nn.modules.linear.Identity"
QUERY_TEXT = "how do vector databases index embeddings?"
DOCS = [
    "HNSW graphs.",
    "Vector databases build approximate nearest neighbour indexes such as HNSW or IVF over "
    "the embeddings, trading a little recall for much lower latency.",
    "The weather in Lisbon was sunny all week.",
    "x",
    "Inverted file indexes cluster vectors and search only the closest clusters at query time.",
]
LONG_DOC = " ".join(["tokenization and batching decide the latency of a reranker"] * 30)


def spec_for(
    folder: Path,
    name: str = "tiny/ce",
    *,
    max_length: int = MAX_LEN,
    load_options: Mapping[str, Any] | None = None,
) -> ModelSpec:
    return parse_spec(
        {
            "name": name,
            "adapter": "cross_encoder",
            "weights_path": str(folder),
            "max_sequence_length": max_length,
            "outputs": {"score": {}},
            "load_options": dict(load_options or {}),
        }
    )


def as_scorer(adapter: Any) -> CrossEncoderAdapter:
    assert isinstance(adapter, CrossEncoderAdapter)
    return adapter


def score_call(
    adapter: PairScorer[TokenizedText],
    query: str,
    docs: Sequence[str],
    instruction: str | None = None,
) -> Any:
    return resolve_score(
        adapter.spec,
        InputItem(text=query),
        [InputItem(text=d) for d in docs],
        ScoreParams(instruction=instruction),
        accepted_options=adapter.score_option_keys(),
        limits=100,
    )


def score(
    adapter: PairScorer[TokenizedText],
    query: str,
    docs: Sequence[str],
    instruction: str | None = None,
) -> list[float]:
    job = adapter.score_job(score_call(adapter, query, docs, instruction))
    with torch.inference_mode():  # as on the engine's model thread
        result: list[float] = run_inline(job)
    return result


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No activation in its files: ST's default is Sigmoid."""
    return build_bert_classifier(tmp_path_factory.mktemp("ce-plain"))


@pytest.fixture(scope="module")
def adapter(plain: Path) -> CrossEncoderAdapter:
    return as_scorer(load_adapter(spec_for(plain)))


@pytest.fixture(scope="module")
def tokenizer(plain: Path) -> Any:
    return AutoTokenizer.from_pretrained(plain)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, plain: Path) -> dict[str, Path]:
    """Every place a model's files can name its activation, and a DeBERTa-v2 reranker."""
    root = tmp_path_factory.mktemp("ce-variants")
    return {
        "bert-default": plain,
        # sentence-transformers >= 5 writes activation_fn to config_sentence_transformers.json.
        "st-save-identity": save_as_cross_encoder(plain, root / "st", torch.nn.Identity()),
        # sentence-transformers 4 wrote it into config.json under "sentence_transformers".
        "st4-config-identity": build_bert_classifier(
            root / "st4",
            seed=1,
            config_extras={"sentence_transformers": {"activation_fn": IDENTITY, "version": "4.0"}},
        ),
        # Older releases (and cross-encoder/ms-marco-*) used this legacy config.json key.
        "legacy-config-identity": build_bert_classifier(
            root / "legacy",
            seed=2,
            config_extras={"sbert_ce_default_activation_function": IDENTITY},
        ),
        # Without trust_remote_code ST ignores a non-torch path and falls back to Sigmoid.
        "legacy-config-untrusted": build_bert_classifier(
            root / "untrusted",
            seed=4,
            config_extras={"sbert_ce_default_activation_function": "my_package.Scaled"},
        ),
        "deberta-v2": build_deberta_classifier(root / "deberta", seed=3),
    }


# ---- scores equal CrossEncoder.predict ----------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [
        "bert-default",
        "st-save-identity",
        "st4-config-identity",
        "legacy-config-identity",
        "legacy-config-untrusted",
        "deberta-v2",
    ],
)
def test_scores_match_cross_encoder_predict(variants: dict[str, Path], variant: str) -> None:
    folder = variants[variant]
    local = as_scorer(load_adapter(spec_for(folder, f"tiny/{variant}")))
    expected_activation = cross_encoder_activation(folder)
    assert type(local.activation) is type(expected_activation)
    want = cross_encoder_scores(folder, [(QUERY_TEXT, d) for d in DOCS])
    got = score(local, QUERY_TEXT, DOCS)
    assert len(got) == len(DOCS)
    assert all(isinstance(s, float) for s in got)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.ptp(want) > 1e-3, "the tiny model must tell the documents apart"


def test_identity_and_sigmoid_variants_differ(variants: dict[str, Path]) -> None:
    # The Identity save of the same weights returns the logits: sigmoid(identity) == default.
    raw = score(as_scorer(load_adapter(spec_for(variants["st-save-identity"]))), QUERY_TEXT, DOCS)
    default = score(as_scorer(load_adapter(spec_for(variants["bert-default"]))), QUERY_TEXT, DOCS)
    np.testing.assert_allclose(torch.sigmoid(torch.tensor(raw)).numpy(), default, atol=1e-6)
    assert not np.allclose(raw, default, atol=1e-3)


@pytest.mark.parametrize(("option", "activation"), [("identity", torch.nn.Identity)])
def test_activation_load_option_overrides_the_files(
    plain: Path, option: str, activation: type[torch.nn.Module]
) -> None:
    from sentence_transformers import CrossEncoder

    local = as_scorer(load_adapter(spec_for(plain, load_options={"activation": option})))
    assert isinstance(local.activation, activation)
    reference = CrossEncoder(str(plain), device="cpu", activation_fn=activation())
    want = reference.predict([(QUERY_TEXT, d) for d in DOCS], show_progress_bar=False)
    np.testing.assert_allclose(score(local, QUERY_TEXT, DOCS), want, atol=1e-5, rtol=0)


def test_sigmoid_load_option_overrides_an_identity_save(variants: dict[str, Path]) -> None:
    folder = variants["st-save-identity"]
    local = as_scorer(load_adapter(spec_for(folder, load_options={"activation": "sigmoid"})))
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(folder), device="cpu", activation_fn=torch.nn.Sigmoid())
    want = reference.predict([(QUERY_TEXT, d) for d in DOCS], show_progress_bar=False)
    np.testing.assert_allclose(score(local, QUERY_TEXT, DOCS), want, atol=1e-5, rtol=0)


def test_bad_activation_load_option_is_a_catalog_error(plain: Path) -> None:
    local = create_adapter(spec_for(plain, load_options={"activation": "tanh"}))
    with pytest.raises(CatalogError, match=r"load_options.activation must be one of .*'tanh'"):
        local.check_spec()


# ---- request semantics --------------------------------------------------------------------------
def test_instruction_is_prepended_to_the_query(adapter: CrossEncoderAdapter, plain: Path) -> None:
    instruction = "Given a web search query, retrieve relevant passages:"
    got = score(adapter, QUERY_TEXT, DOCS, instruction=instruction)
    want = cross_encoder_scores(plain, [(f"{instruction} {QUERY_TEXT}", d) for d in DOCS])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert not np.allclose(got, score(adapter, QUERY_TEXT, DOCS), atol=1e-4)


def test_only_the_document_is_truncated(plain: Path, tokenizer: Any) -> None:
    limit = 40
    local = as_scorer(load_adapter(spec_for(plain, max_length=limit)))
    call = score_call(local, QUERY_TEXT, [LONG_DOC, DOCS[0]])
    long_pair, short_pair = local.prepare_pairs(call.query, call.items, call.settings)
    query_ids = tokenizer(QUERY_TEXT)["input_ids"]  # [CLS] query [SEP]
    assert len(long_pair.input_ids) == limit
    assert long_pair.input_ids[: len(query_ids)] == query_ids, "every query token is kept"
    assert long_pair.input_ids[-1] == tokenizer.sep_token_id
    assert long_pair.truncated
    assert not short_pair.truncated
    assert short_pair.input_ids == tokenizer(QUERY_TEXT, DOCS[0])["input_ids"]
    # With a short query, CrossEncoder's longest_first truncation also cuts only the document.
    want = cross_encoder_scores(plain, [(QUERY_TEXT, LONG_DOC), (QUERY_TEXT, DOCS[0])], limit)
    np.testing.assert_allclose(run_inline(local.score_job(call)), want, atol=1e-5, rtol=0)


def test_query_leaving_no_room_for_the_document_is_input_too_long(
    plain: Path, tokenizer: Any
) -> None:
    limit = 24
    local = as_scorer(load_adapter(spec_for(plain, max_length=limit)))
    query = "a query much too long for the tiny limit " * 3
    count = len(tokenizer(query, add_special_tokens=False)["input_ids"])
    assert count + 3 >= limit
    with pytest.raises(
        InputTooLong, match=rf"query is {count} tokens .* max_sequence_length {limit}"
    ):
        score(local, query, ["doc"])
    # A query with room for one document token is served, the document cut to fit.
    fits = " ".join(["word"] * (limit - 4))
    assert len(tokenizer(fits, add_special_tokens=False)["input_ids"]) == limit - 4
    call = score_call(local, fits, [LONG_DOC])
    (pair,) = local.prepare_pairs(call.query, call.items, call.settings)
    assert len(pair.input_ids) == limit
    assert pair.truncated


def test_text_only(adapter: CrossEncoderAdapter) -> None:
    image = (ImageData(b"\x89PNG", "png"),)
    call = score_call(adapter, QUERY_TEXT, DOCS[:1])
    # Validation refuses images for a text-only model before any work ...
    with pytest.raises(InvalidInput, match="query 0: model tiny/ce accepts text only"):
        resolve_score_call(adapter, InputItem(images=image), DOCS[:1])
    # ... and the family itself refuses a call that skipped it.
    with pytest.raises(InvalidInput, match="the query needs text"):
        adapter.score_job(dataclasses.replace(call, query=InputItem(images=image)))
    with pytest.raises(InvalidInput, match="item 1: model tiny/ce accepts text only"):
        adapter.prepare_pairs(
            call.query, [InputItem(text="ok"), InputItem(images=image)], call.settings
        )
    with pytest.raises(InvalidInput, match="item 0 has no text"):
        adapter.prepare_pairs(call.query, [InputItem()], call.settings)


def resolve_score_call(adapter: CrossEncoderAdapter, query: InputItem, docs: Sequence[str]) -> Any:
    return resolve_score(
        adapter.spec,
        query,
        [InputItem(text=d) for d in docs],
        ScoreParams(),
        accepted_options=adapter.score_option_keys(),
        limits=10,
    )


# ---- batching and costs -------------------------------------------------------------------------
def test_batching_does_not_change_scores(adapter: CrossEncoderAdapter) -> None:
    together = score(adapter, QUERY_TEXT, DOCS)
    alone = [score(adapter, QUERY_TEXT, [d])[0] for d in DOCS]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_pairs_of_different_requests_share_a_forward_pass(
    adapter: CrossEncoderAdapter, plain: Path
) -> None:
    first = adapter.score_job(score_call(adapter, QUERY_TEXT, DOCS[:3]))
    other_query = "what is the capital of Portugal?"
    second = adapter.score_job(score_call(adapter, other_query, DOCS[2:], instruction="Answer:"))
    (g1,), (g2,) = first.groups, second.groups
    assert g1.key == g2.key
    # The engine runs them as one batch with the first request's runner (mixed order).
    mixed = [*g2.payloads, *g1.payloads]
    out = g1.runner.run(g1.runner.collate(mixed))
    got1 = first.finish([out[len(g2.payloads) :]])
    got2 = second.finish([out[: len(g2.payloads)]])
    want1 = cross_encoder_scores(plain, [(QUERY_TEXT, d) for d in DOCS[:3]])
    want2 = cross_encoder_scores(plain, [(f"Answer: {other_query}", d) for d in DOCS[2:]])
    np.testing.assert_allclose(got1, want1, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got2, want2, atol=1e-5, rtol=0)


def test_pair_costs_and_token_types_are_the_tokenizers(
    adapter: CrossEncoderAdapter, tokenizer: Any
) -> None:
    job = adapter.score_job(score_call(adapter, QUERY_TEXT, DOCS))
    (group,) = job.groups
    encoded = [tokenizer(QUERY_TEXT, d) for d in DOCS]
    assert list(group.costs) == [len(e["input_ids"]) for e in encoded]
    assert job.tokens == sum(group.costs)
    assert [p.input_ids for p in group.payloads] == [e["input_ids"] for e in encoded]
    # BERT reads token types: the document side is segment 1.
    assert adapter.token_types
    assert [p.extra for p in group.payloads] == [e["token_type_ids"] for e in encoded]
    inputs = group.runner.collate(list(group.payloads))
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert inputs["token_type_ids"].shape == inputs["input_ids"].shape


# ---- lifecycle -----------------------------------------------------------------------------------
def test_memory_and_unload(plain: Path) -> None:
    local = as_scorer(load_adapter(spec_for(plain)))
    expected = parameter_bytes(local.model)
    assert expected > 0
    assert local.memory_bytes() == expected
    local.unload()
    assert local.memory_bytes() == 0
    assert local.model is None


def test_more_than_one_label_is_not_a_reranker(tmp_path: Path) -> None:
    folder = build_bert_classifier(tmp_path / "two", num_labels=2)
    with pytest.raises(CatalogError, match=r"needs one output logit.*num_labels=2"):
        load_adapter(spec_for(folder))


def test_a_cross_encoder_save_with_extra_modules_is_refused(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "with-dense"
    shutil.copytree(variants["st-save-identity"], folder)
    modules = json.loads((folder / "modules.json").read_text())
    assert len(modules) == 1
    dense = {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.Dense"}
    (folder / "modules.json").write_text(json.dumps([*modules, dense]))
    with pytest.raises(CatalogError, match=r"modules.json lists 2 modules"):
        load_adapter(spec_for(folder))


def test_warm_up_runs(adapter: CrossEncoderAdapter, plain: Path) -> None:
    spec = adapter.spec
    warm_up(adapter, spec)
    (call,) = list(sample_calls(spec, type(adapter)))
    got = run_inline(job_for(adapter, call))
    np.testing.assert_allclose(got, cross_encoder_scores(plain, [(QUERY, TEXT)]), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "max_length"),
    [
        ("BAAI/bge-reranker-v2-m3", 8192),
        ("cross-encoder/ms-marco-MiniLM-L-6-v2", 512),
        ("mixedbread-ai/mxbai-rerank-base-v1", 512),
    ],
)
def test_catalog_entries(name: str, max_length: int) -> None:
    spec = load_catalog([BUILTIN_CATALOG_DIR])[name]
    assert spec.adapter == "cross_encoder"
    assert spec.hf_id == name
    assert spec.max_sequence_length == max_length
    assert set(spec.outputs) == {"score"}
    assert spec.tasks == ("score",)
    assert set(spec.tasks) <= tasks_of(CrossEncoderAdapter)
    create_adapter(spec).check_spec()
