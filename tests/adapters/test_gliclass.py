"""GLiClass adapter against gliclass's own ZeroShotClassificationPipeline on tiny random models
(DeBERTa, text first, like the v1.0 checkpoints; BERT, labels first; BERT with mean pooling and a
fixed class allocation), driven through ``resolve_extract`` + ``extract_job`` + ``run_inline``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from sie_server.adapters.base import tasks_of
from sie_server.adapters.gliclass import GLiClassAdapter
from sie_server.adapters.hf import parameter_bytes
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import BUILTIN_CATALOG_DIR, CatalogError, ModelSpec, load_catalog
from sie_server.catalog.spec import parse_spec
from sie_server.domain import ImageData, InputItem, LoadTarget
from sie_server.engine.warmup import job_for, run_inline, sample_calls, warm_up
from sie_server.errors import InputTooLong, InvalidInput, ModelLoadFailed
from sie_server.tasks.extract import ExtractCall, ExtractedItem, ExtractParams, resolve_extract

from tests.tiny_models.gliclass import build_tiny_gliclass, reference_pipeline, reference_scores

# transformers' DeBERTa-v2 module (imported by gliclass) calls torch.jit.script at import.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

CAP = 128
NAME = "tiny/gliclass"
LABELS = ["travel", "sport", "science", "cooking"]
TEXTS = [
    "One day I will see the world!",
    "The match went to penalties and the home team won.",
    "x",
    "Researchers measured how quickly the enzyme folds at low temperature, then repeated it.",
    "Slow-cooked beans with garlic.",
]
LONG = " ".join(["the committee reviewed every travel claim filed by the science team"] * 20)
KINDS = ("single-label", "multi-label")


def spec_for(folder: Path, load_options: Mapping[str, Any] | None = None) -> ModelSpec:
    return parse_spec(
        {
            "name": NAME,
            "adapter": "gliclass",
            "weights_path": str(folder),
            "max_sequence_length": CAP,
            "outputs": {"json": {}},
            "load_options": dict(
                {"classification_type": "single-label"} if load_options is None else load_options
            ),
        }
    )


def load(
    folder: Path, load_options: Mapping[str, Any] | None = None, dtype: str = "float32"
) -> tuple[GLiClassAdapter, ModelSpec]:
    spec = spec_for(folder, load_options)
    adapter = create_adapter(spec)
    assert isinstance(adapter, GLiClassAdapter)
    adapter.check_spec()
    adapter.load(LoadTarget(source=str(folder), device="cpu", dtype=dtype))
    return adapter, spec


def call_for(
    spec: ModelSpec,
    texts: Sequence[str],
    labels: Sequence[str],
    options: Mapping[str, Any] | None = None,
    instruction: str | None = None,
) -> ExtractCall:
    return resolve_extract(
        spec,
        [InputItem(text=t) for t in texts],
        ExtractParams(labels=labels, instruction=instruction, options=dict(options or {})),
        support=GLiClassAdapter.extract_support,
        accepted_options=GLiClassAdapter.extract_options,
        limits=64,
    )


def extract(
    adapter: GLiClassAdapter,
    spec: ModelSpec,
    texts: Sequence[str],
    labels: Sequence[str],
    options: Mapping[str, Any] | None = None,
    instruction: str | None = None,
) -> list[ExtractedItem]:
    result: list[ExtractedItem] = run_inline(
        adapter.extract_job(call_for(spec, texts, labels, options, instruction))
    )
    return result


def scores_of(item: ExtractedItem) -> dict[str, float]:
    return {c.label: c.score for c in item.classifications}


def assert_matches(
    items: Sequence[ExtractedItem], reference: Sequence[Mapping[str, float]]
) -> None:
    assert len(items) == len(reference)
    for item, want in zip(items, reference, strict=True):
        assert (item.entities, item.relations, item.objects) == ([], [], [])
        got = scores_of(item)
        assert list(got) == sorted(got, key=lambda label: -got[label]), "sorted by score"
        assert set(got) == set(want), "every label is returned"
        for label, score in want.items():
            assert got[label] == pytest.approx(score, abs=1e-5), label


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Like gliclass-*-v1.0: a DeBERTa-v3-shaped backbone, text before labels.
    return build_tiny_gliclass(tmp_path_factory.mktemp("gliclass-text-first"), backbone="deberta")


@pytest.fixture(scope="module")
def labels_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gliclass(
        tmp_path_factory.mktemp("gliclass-labels-first"), prompt_first=True, seed=1
    )


@pytest.fixture(scope="module")
def mean_pooled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gliclass(
        tmp_path_factory.mktemp("gliclass-avg"), pooling="avg", max_labels_alloc=4, seed=2
    )


@pytest.fixture(scope="module")
def models(text_first: Path, labels_first: Path) -> dict[str, tuple[GLiClassAdapter, ModelSpec]]:
    return {"text_first": load(text_first), "labels_first": load(labels_first)}


@pytest.fixture(scope="module")
def pipelines(text_first: Path, labels_first: Path) -> dict[str, Any]:
    return {
        "text_first": reference_pipeline(text_first, CAP),
        "labels_first": reference_pipeline(labels_first, CAP),
    }


LAYOUTS = ("text_first", "labels_first")


# ---- scores ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_the_pipeline(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]],
    pipelines: dict[str, Any],
    layout: str,
    kind: str,
) -> None:
    adapter, spec = models[layout]
    items = extract(adapter, spec, TEXTS, LABELS, {"classification_type": kind})
    reference = reference_scores(pipelines[layout], TEXTS, LABELS, kind)
    assert_matches(items, reference)
    spread = max(max(r.values()) - min(r.values()) for r in reference)
    assert spread > 0.1, "the tiny model must tell labels apart"
    if kind == "single-label":
        for item in items:
            assert sum(scores_of(item).values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("load_options", "kind"),
    [
        ({"classification_type": "single-label"}, "single-label"),  # the catalog's
        ({}, "single-label"),  # the family default, as SIE's
        ({"classification_type": "multi-label"}, "multi-label"),
    ],
)
def test_load_option_sets_the_default_classification_type(
    text_first: Path, pipelines: dict[str, Any], load_options: dict[str, Any], kind: str
) -> None:
    adapter, spec = load(text_first, load_options)
    items = extract(adapter, spec, TEXTS, LABELS)
    assert_matches(items, reference_scores(pipelines["text_first"], TEXTS, LABELS, kind))


def test_threshold_filters_but_keeps_the_order(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]],
) -> None:
    adapter, spec = models["text_first"]
    full = extract(adapter, spec, TEXTS, LABELS, {"classification_type": "multi-label"})
    every = sorted(c.score for item in full for c in item.classifications)
    threshold = every[len(every) // 2]
    kept = extract(
        adapter,
        spec,
        TEXTS,
        LABELS,
        {"classification_type": "multi-label", "threshold": threshold},
    )
    total = 0
    for item, whole in zip(kept, full, strict=True):
        want = [c for c in whole.classifications if c.score >= threshold]
        assert [c.label for c in item.classifications] == [c.label for c in want]
        for got, ref in zip(item.classifications, want, strict=True):
            assert got.score == pytest.approx(ref.score, abs=1e-6)
        total += len(item.classifications)
    assert 0 < total < len(every)


def test_instruction_is_the_pipeline_prompt(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]], pipelines: dict[str, Any]
) -> None:
    instruction = "Classify the topic of this text:"
    for layout in LAYOUTS:
        adapter, spec = models[layout]
        items = extract(
            adapter, spec, TEXTS, LABELS, {"classification_type": "multi-label"}, instruction
        )
        reference = reference_scores(
            pipelines[layout], TEXTS, LABELS, "multi-label", prompt=instruction
        )
        assert_matches(items, reference)
        plain = reference_scores(pipelines[layout], TEXTS, LABELS, "multi-label")
        assert any(
            abs(r[label] - p[label]) > 1e-3
            for r, p in zip(reference, plain, strict=True)
            for label in LABELS
        ), "the instruction must change the input"


# ---- overflow ----------------------------------------------------------------------------------
def counts(pipeline: Any, text: str, labels: Sequence[str]) -> tuple[int, int]:
    """(text tokens, label-prompt tokens), counted apart: the text alone without special tokens;
    the pipeline's input for an empty text (its label prompt) with them."""
    tokenizer = pipeline.pipe.tokenizer
    text_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_tokens = len(tokenizer(pipeline.pipe.prepare_input("", list(labels)))["input_ids"])
    return text_tokens, prompt_tokens


def too_long_message(pipeline: Any, index: int, text: str) -> str:
    text_tokens, prompt_tokens = counts(pipeline, text, LABELS)
    assert text_tokens + prompt_tokens > CAP
    return (
        f"Item {index}: observed {text_tokens + prompt_tokens} tokens (text={text_tokens}, "
        f"label_prompt={prompt_tokens}) exceeds context cap {CAP} for {NAME}"
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_error_policy_raises_input_too_long(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]], pipelines: dict[str, Any], layout: str
) -> None:
    adapter, spec = models[layout]
    # Refused while preparing the job: no forward pass.
    with pytest.raises(InputTooLong) as info:
        adapter.extract_job(call_for(spec, [TEXTS[0], LONG], LABELS, {"overflow_policy": "error"}))
    assert info.value.message == too_long_message(pipelines[layout], 1, LONG)
    assert str(info.value) == info.value.message
    assert info.value.model == NAME
    assert info.value.reason == "INPUT_TOO_LONG"
    assert isinstance(info.value, InvalidInput)
    # Inputs within the cap pass under every policy.
    fits = extract(adapter, spec, TEXTS, LABELS, {"overflow_policy": "error"})
    assert [scores_of(i) for i in fits] == [
        scores_of(i) for i in extract(adapter, spec, TEXTS, LABELS)
    ]


def test_default_policy_refuses_overflow_on_a_text_first_model(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]], pipelines: dict[str, Any]
) -> None:
    # The pipeline would cut the labels at the end of the sequence (SIE's v1.0 behaviour).
    adapter, spec = models["text_first"]
    for options in ({}, {"overflow_policy": "default"}):
        with pytest.raises(InputTooLong) as info:
            adapter.extract_job(call_for(spec, [LONG], LABELS, options))
        assert info.value.message == too_long_message(pipelines["text_first"], 0, LONG)


def test_default_policy_on_a_labels_first_model_cuts_the_text_like_the_pipeline(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]], pipelines: dict[str, Any]
) -> None:
    adapter, spec = models["labels_first"]
    texts = [LONG, TEXTS[1]]
    items = extract(adapter, spec, texts, LABELS, {"classification_type": "multi-label"})
    # The pipeline gets the whole text and truncates at max_length itself.
    assert_matches(items, reference_scores(pipelines["labels_first"], texts, LABELS, "multi-label"))
    cut = extract(
        adapter,
        spec,
        texts,
        LABELS,
        {"classification_type": "multi-label", "overflow_policy": "truncate_text"},
    )
    assert [scores_of(i) for i in cut] == [scores_of(i) for i in items]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncate_text_keeps_every_label_and_cuts_the_text_end(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]],
    pipelines: dict[str, Any],
    layout: str,
) -> None:
    adapter, spec = models[layout]
    pipeline = pipelines[layout]
    tokenizer = pipeline.pipe.tokenizer
    text_tokens, prompt_tokens = counts(pipeline, LONG, LABELS)
    budget = CAP - prompt_tokens
    assert 0 < budget < text_tokens
    enc = tokenizer(LONG, add_special_tokens=False, return_offsets_mapping=True)
    kept_text = LONG[: enc["offset_mapping"][budget - 1][1]]
    options = {"classification_type": "multi-label", "overflow_policy": "truncate_text"}

    job = adapter.extract_job(call_for(spec, [LONG, TEXTS[0]], LABELS, options))
    (payload, short) = job.groups[0].payloads
    assert payload.cost == CAP
    assert payload.truncated
    assert (payload.text_tokens, payload.label_prompt_tokens) == (budget, prompt_tokens)
    # Exactly the pipeline's input for the kept text, labels intact.
    assert (
        payload.input_ids == tokenizer(pipeline.pipe.prepare_input(kept_text, LABELS))["input_ids"]
    )
    assert not short.truncated
    assert sum(job.groups[0].costs) == job.tokens == CAP + short.cost

    items = run_inline(job)
    reference = reference_scores(pipeline, [kept_text, TEXTS[0]], LABELS, "multi-label")
    assert_matches(items, reference)


def test_truncate_text_refuses_a_label_prompt_over_the_cap(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]], pipelines: dict[str, Any]
) -> None:
    adapter, spec = models["text_first"]
    labels = [f"category number {i}" for i in range(40)]
    text_tokens, prompt_tokens = counts(pipelines["text_first"], "hi", labels)
    assert prompt_tokens > CAP
    with pytest.raises(InputTooLong) as info:
        adapter.extract_job(call_for(spec, ["hi"], labels, {"overflow_policy": "truncate_text"}))
    assert info.value.message == (
        f"Item 0: observed {text_tokens + prompt_tokens} tokens (text={text_tokens}, "
        f"label_prompt={prompt_tokens}) exceeds context cap {CAP} for {NAME}"
    )


# ---- batching ----------------------------------------------------------------------------------
def test_requests_with_other_labels_and_thresholds_share_a_forward_pass(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]],
) -> None:
    adapter, spec = models["text_first"]
    first = call_for(spec, TEXTS[:3], LABELS, {"classification_type": "multi-label"})
    other_labels = ["finance", "music", "weather", "health"]
    second = call_for(
        spec, TEXTS[3:], other_labels, {"threshold": 0.2}, instruction="What is this about?"
    )
    job_a, job_b = adapter.extract_job(first), adapter.extract_job(second)
    group_a, group_b = job_a.groups[0], job_b.groups[0]
    assert group_a.key == group_b.key, "thresholds, label texts and instructions do not split"
    assert adapter.extract_job(call_for(spec, TEXTS, LABELS[:3])).groups[0].key != group_a.key

    payloads = [*group_a.payloads, *group_b.payloads]
    assert len({p.cost for p in payloads}) > 1, "rows of different lengths: padding is exercised"
    # The engine runs a shared batch with the first request's runner.
    outputs = group_a.runner.run(group_a.runner.collate(payloads))
    split = len(group_a.payloads)
    together_a = job_a.finish([outputs[:split]])
    together_b = job_b.finish([outputs[split:]])

    for together, call in ((together_a, first), (together_b, second)):
        alone = run_inline(adapter.extract_job(call))
        assert len(together) == len(alone)
        for got, want in zip(together, alone, strict=True):
            assert [c.label for c in got.classifications] == [c.label for c in want.classifications]
            for g, w in zip(got.classifications, want.classifications, strict=True):
                assert g.score == pytest.approx(w.score, abs=1e-5)
    assert all(c.score >= 0.2 for item in together_b for c in item.classifications)
    assert any(len(item.classifications) < len(other_labels) for item in together_b)


def test_padding_sensitive_pooling_runs_rows_unpadded(mean_pooled: Path) -> None:
    # gliclass pools "avg" over padded positions too: the pipeline's own score depends on the
    # batch; alone (batch_size=1) is the reference, and the adapter gives it in any batch.
    adapter, spec = load(mean_pooled)
    pipeline = reference_pipeline(mean_pooled, CAP)
    labels = LABELS[:3]
    alone = reference_scores(pipeline, TEXTS, labels, "single-label", batch_size=1)
    padded = reference_scores(pipeline, TEXTS, labels, "single-label")
    assert any(
        abs(a[label] - p[label]) > 1e-4
        for a, p in zip(alone, padded, strict=True)
        for label in labels
    ), "the pipeline's batched scores depend on padding for this model"

    job = adapter.extract_job(call_for(spec, TEXTS, labels))
    batch = job.groups[0].runner.collate(list(job.groups[0].payloads))
    assert len(batch.groups) == len({p.cost for p in job.groups[0].payloads}) > 1
    assert_matches(run_inline(job), alone)

    # max_labels_alloc 4: every batch has 4 class slots; more labels than that are refused.
    assert job.groups[0].key == adapter.extract_job(call_for(spec, TEXTS, LABELS)).groups[0].key
    with pytest.raises(InvalidInput, match="takes at most 4 labels, got 5"):
        adapter.extract_job(call_for(spec, TEXTS, [*LABELS, "music"]))


# ---- validation --------------------------------------------------------------------------------
def test_request_errors_name_the_problem(
    models: dict[str, tuple[GLiClassAdapter, ModelSpec]],
) -> None:
    adapter, spec = models["text_first"]
    with pytest.raises(InvalidInput, match="labels are required"):
        call_for(spec, TEXTS, [])
    with pytest.raises(InvalidInput, match="output_schema"):
        resolve_extract(
            spec,
            [InputItem(text="x")],
            ExtractParams(labels=LABELS, output_schema={"type": "object"}),
            support=GLiClassAdapter.extract_support,
            accepted_options=GLiClassAdapter.extract_options,
            limits=8,
        )
    with pytest.raises(InvalidInput, match="unknown option 'treshold'"):
        call_for(spec, TEXTS, LABELS, {"treshold": 0.5})
    bad = {
        "overflow_policy": "cut",
        "classification_type": "multi",
        "threshold": 1.5,
    }
    for key, value in bad.items():
        with pytest.raises(InvalidInput, match=f"option '{key}'") as info:
            adapter.extract_job(call_for(spec, TEXTS, LABELS, {key: value}))
        assert not isinstance(info.value, InputTooLong)
    with pytest.raises(InvalidInput, match="accepts text only"):
        adapter.extract_job(
            resolve_extract(
                spec,
                [InputItem(images=(ImageData(b"\x89PNG"),))],
                ExtractParams(labels=LABELS),
                support=GLiClassAdapter.extract_support,
                accepted_options=GLiClassAdapter.extract_options,
                limits=8,
            )
        )


def test_warm_up_memory_and_unload(text_first: Path) -> None:
    adapter, spec = load(text_first)
    assert tasks_of(GLiClassAdapter) == frozenset({"extract"})
    assert spec.tasks == ("extract",)
    warm_up(adapter, spec)
    (call,) = list(sample_calls(spec, type(adapter)))
    (item,) = run_inline(job_for(adapter, call))
    assert {c.label for c in item.classifications} == {"person", "location"}
    assert adapter.memory_bytes() == parameter_bytes(adapter.model) > 0
    adapter.unload()
    assert adapter.memory_bytes() == 0


# ---- catalog and loading -----------------------------------------------------------------------
def test_bfloat16_casts_the_whole_model(text_first: Path) -> None:
    import torch

    adapter, spec = load(text_first, dtype="bfloat16")
    # from_pretrained(dtype=...) alone leaves the backbone in float32 and the forward fails.
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    fp32, _ = load(text_first)
    assert adapter.memory_bytes() < 0.6 * fp32.memory_bytes()
    pipeline = reference_pipeline(text_first, CAP, dtype=torch.bfloat16)
    options = {"classification_type": "multi-label"}
    items = extract(adapter, spec, TEXTS, LABELS, options)
    assert_matches(items, reference_scores(pipeline, TEXTS, LABELS, "multi-label"))


def test_catalog_entries() -> None:
    catalog = load_catalog([BUILTIN_CATALOG_DIR])
    for size in ("small", "base", "large"):
        spec = catalog[f"knowledgator/gliclass-{size}-v1.0"]
        assert spec.adapter == "gliclass"
        assert spec.hf_id == f"knowledgator/gliclass-{size}-v1.0"
        assert spec.max_sequence_length == 512
        assert set(spec.outputs) == {"json"}
        assert spec.tasks == ("extract",)
        assert spec.load_options == {"classification_type": "single-label"}
        adapter = create_adapter(spec)
        assert isinstance(adapter, GLiClassAdapter)
        adapter.check_spec()


@pytest.mark.parametrize(
    ("load_options", "message"),
    [
        ({"classification_type": "multi"}, "classification_type must be one of"),
        ({"threshold": 0.5}, "unknown load option 'threshold'"),
    ],
)
def test_check_spec_rejects_bad_load_options(
    text_first: Path, load_options: dict[str, Any], message: str
) -> None:
    with pytest.raises(CatalogError, match=message):
        create_adapter(spec_for(text_first, load_options)).check_spec()


def test_load_refuses_what_the_adapter_cannot_serve(text_first: Path, tmp_path: Path) -> None:
    other = tmp_path / "bi-encoder"
    shutil.copytree(text_first, other)
    config = json.loads((other / "config.json").read_text())
    config["architecture_type"] = "bi-encoder"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadFailed, match="architecture 'bi-encoder' is not supported"):
        load(other)

    plain = tmp_path / "plain-tokenizer"
    shutil.copytree(text_first, plain)
    for path in plain.glob("tokenizer*"):
        path.unlink()
    shutil.copy(text_first.parent / "backbone" / "tokenizer.json", plain / "tokenizer.json")
    shutil.copy(text_first.parent / "backbone" / "tokenizer_config.json", plain)
    with pytest.raises(ModelLoadFailed, match="the model expects class_token_index"):
        load(plain)
