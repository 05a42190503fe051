"""NLI zero-shot classification against transformers' ``zero-shot-classification`` pipeline on
tiny random NLI classifiers (BERT entailment/neutral/contradiction in two label orders, DeBERTa-v2
entailment/not_entailment), driven through ``extract_job`` + ``run_inline``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sie_server.adapters.base import tasks_of
from sie_server.adapters.hf import parameter_bytes
from sie_server.adapters.nli_zero_shot import DEFAULT_TEMPLATE, NLIZeroShotAdapter
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import BUILTIN_CATALOG_DIR, CatalogError, ModelSpec, load_catalog
from sie_server.catalog.spec import parse_spec
from sie_server.domain import InputItem
from sie_server.engine.warmup import TEXT, job_for, run_inline, sample_calls, warm_up
from sie_server.errors import InputTooLong, InvalidInput
from sie_server.tasks.extract import ExtractCall, ExtractedItem, ExtractParams, resolve_extract
from transformers import AutoTokenizer

from tests.harness import load_adapter
from tests.tiny_models.classifiers import (
    DEBERTA_JIT_WARNING,
    build_bert_classifier,
    build_deberta_classifier,
    zero_shot_pipeline,
    zero_shot_reference,
)

pytestmark = pytest.mark.filterwarnings(DEBERTA_JIT_WARNING)


#: The tokenizers are saved with this model_max_length, so the pipeline truncates where we do.
MAX_LEN = 64
TEXTS = [
    "The striker scored twice in the final minutes of the match.",
    "Shares of the chip maker fell after the quarterly earnings report.",
    " ".join(["The parliament debated the new budget and the tax reform late into the night."] * 8),
]
LABELS = ["sports", "finance", "politics"]
TEMPLATE = "The topic of this text is {}."


def spec_for(folder: Path, name: str, *, max_length: int = MAX_LEN) -> ModelSpec:
    return parse_spec(
        {
            "name": name,
            "adapter": "nli_zero_shot",
            "weights_path": str(folder),
            "max_sequence_length": max_length,
            "outputs": {"json": {}},
        }
    )


def as_nli(adapter: Any) -> NLIZeroShotAdapter:
    assert isinstance(adapter, NLIZeroShotAdapter)
    return adapter


def extract_call(
    adapter: NLIZeroShotAdapter,
    texts: Sequence[str],
    labels: Sequence[str],
    options: Mapping[str, Any] | None = None,
) -> ExtractCall:
    return resolve_extract(
        adapter.spec,
        [InputItem(text=t) for t in texts],
        ExtractParams(labels=labels, options=dict(options or {})),
        support=adapter.extract_support,
        accepted_options=adapter.extract_options,
        limits=100,
    )


def extract(
    adapter: NLIZeroShotAdapter,
    texts: Sequence[str],
    labels: Sequence[str],
    options: Mapping[str, Any] | None = None,
) -> list[ExtractedItem]:
    job = adapter.extract_job(extract_call(adapter, texts, labels, options))
    with torch.inference_mode():  # as on the engine's model thread
        result: list[ExtractedItem] = run_inline(job)
    return result


def assert_same(got: Sequence[ExtractedItem], want: Sequence[list[tuple[str, float]]]) -> None:
    assert len(got) == len(want)
    for item, ref in zip(got, want, strict=True):
        assert item.entities == []
        assert item.relations == []
        assert item.objects == []
        assert [c.label for c in item.classifications] == [label for label, _ in ref]
        np.testing.assert_allclose(
            [c.score for c in item.classifications], [s for _, s in ref], atol=1e-5, rtol=0
        )
        scores = [c.score for c in item.classifications]
        assert scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nli")
    return {
        # entailment first: the pipeline's "contradiction" column is the last one.
        "bert-enc": build_bert_classifier(
            root / "enc",
            labels=["entailment", "neutral", "contradiction"],
            model_max_length=MAX_LEN,
        ),
        # MNLI order (roberta-large-mnli): contradiction 0, entailment 2.
        "bert-cne": build_bert_classifier(
            root / "cne",
            labels=["contradiction", "neutral", "entailment"],
            seed=1,
            model_max_length=MAX_LEN,
        ),
        # An order where the pipeline's positional rule picks "neutral" (the last column) as the
        # contradiction column for multi_label; we mirror it.
        "bert-ecn": build_bert_classifier(
            root / "ecn",
            labels=["entailment", "contradiction", "neutral"],
            seed=3,
            model_max_length=MAX_LEN,
        ),
        # deberta-v3-base-zeroshot-v2.0: entailment 0, not_entailment 1.
        "deberta-2way": build_deberta_classifier(
            root / "two-way",
            labels=["entailment", "not_entailment"],
            seed=2,
            model_max_length=MAX_LEN,
        ),
    }


@pytest.fixture(scope="module")
def pipelines(folders: dict[str, Path]) -> dict[str, Any]:
    return {k: zero_shot_pipeline(f) for k, f in folders.items()}


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, NLIZeroShotAdapter]:
    return {k: as_nli(load_adapter(spec_for(f, f"tiny/{k}"))) for k, f in folders.items()}


# ---- results equal the pipeline's ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "template"),
    [
        ("bert-enc", None),
        ("bert-cne", None),
        ("bert-ecn", None),
        ("deberta-2way", None),
        ("deberta-2way", TEMPLATE),
    ],
)
@pytest.mark.parametrize("multi_label", [False, True])
def test_matches_the_pipeline(
    pipelines: dict[str, Any],
    adapters: dict[str, NLIZeroShotAdapter],
    variant: str,
    multi_label: bool,
    template: str | None,
) -> None:
    options: dict[str, Any] = {"multi_label": multi_label}
    if template is not None:
        options["hypothesis_template"] = template
    got = extract(adapters[variant], TEXTS, LABELS, options)
    want = zero_shot_reference(
        pipelines[variant], TEXTS, LABELS, hypothesis_template=template, multi_label=multi_label
    )
    assert_same(got, want)
    if not multi_label:
        for item in got:
            assert sum(c.score for c in item.classifications) == pytest.approx(1.0, abs=1e-5)


def test_entailment_and_contradiction_columns(adapters: dict[str, NLIZeroShotAdapter]) -> None:
    assert (adapters["bert-enc"].entailment_id, adapters["bert-enc"].contradiction_id) == (0, -1)
    assert (adapters["bert-cne"].entailment_id, adapters["bert-cne"].contradiction_id) == (2, 0)
    assert (adapters["bert-ecn"].entailment_id, adapters["bert-ecn"].contradiction_id) == (0, -1)
    two_way = adapters["deberta-2way"]
    assert (two_way.entailment_id, two_way.contradiction_id) == (0, -1)


def test_a_single_label_scores_entailment_against_contradiction(
    pipelines: dict[str, Any], adapters: dict[str, NLIZeroShotAdapter]
) -> None:
    got = extract(adapters["bert-enc"], TEXTS[:2], ["sports"])
    want = zero_shot_reference(pipelines["bert-enc"], TEXTS[:2], ["sports"])
    assert_same(got, want)
    assert got[0].classifications[0].score != pytest.approx(1.0)


def test_defaults_are_the_pipelines(
    pipelines: dict[str, Any], adapters: dict[str, NLIZeroShotAdapter]
) -> None:
    assert DEFAULT_TEMPLATE == "This example is {}."
    got = extract(adapters["deberta-2way"], TEXTS[:2], LABELS)
    assert_same(got, zero_shot_reference(pipelines["deberta-2way"], TEXTS[:2], LABELS))


# ---- batching ----------------------------------------------------------------------------------
def test_requests_with_different_labels_share_forward_passes(
    pipelines: dict[str, Any], adapters: dict[str, NLIZeroShotAdapter]
) -> None:
    adapter = adapters["bert-enc"]
    labels_b = ["weather", "sports"]
    first = adapter.extract_job(extract_call(adapter, TEXTS[:2], LABELS))
    second = adapter.extract_job(
        extract_call(
            adapter, TEXTS[2:], labels_b, {"multi_label": True, "hypothesis_template": TEMPLATE}
        )
    )
    (g1,), (g2,) = first.groups, second.groups
    assert g1.key == g2.key
    # One batch, in mixed order, run with the first request's runner (as the executor does).
    mixed = [*g2.payloads, *g1.payloads]
    out = g1.runner.run(g1.runner.collate(mixed))
    n2 = len(g2.payloads)
    together_first = first.finish([out[n2:]])
    together_second = second.finish([out[:n2]])
    alone_first = extract(adapter, TEXTS[:2], LABELS)
    alone_second = extract(
        adapter, TEXTS[2:], labels_b, {"multi_label": True, "hypothesis_template": TEMPLATE}
    )
    for together, alone in ((together_first, alone_first), (together_second, alone_second)):
        assert_same(
            together,
            [[(c.label, c.score) for c in item.classifications] for item in alone],
        )
    classifier = pipelines["bert-enc"]
    assert_same(together_first, zero_shot_reference(classifier, TEXTS[:2], LABELS))
    assert_same(
        together_second,
        zero_shot_reference(
            classifier, TEXTS[2:], labels_b, hypothesis_template=TEMPLATE, multi_label=True
        ),
    )


def test_one_payload_per_item_and_label(
    folders: dict[str, Path], adapters: dict[str, NLIZeroShotAdapter]
) -> None:
    adapter = adapters["bert-enc"]
    tokenizer = AutoTokenizer.from_pretrained(folders["bert-enc"])
    job = adapter.extract_job(extract_call(adapter, TEXTS, LABELS[:2]))
    (group,) = job.groups
    pairs = [(text, f"This example is {label}.") for text in TEXTS for label in LABELS[:2]]
    encoded = [tokenizer(t, h, truncation="only_first", max_length=MAX_LEN) for t, h in pairs]
    assert [p.input_ids for p in group.payloads] == [e["input_ids"] for e in encoded]
    assert [p.extra for p in group.payloads] == [e["token_type_ids"] for e in encoded]
    assert list(group.costs) == [len(e["input_ids"]) for e in encoded]
    assert job.tokens == sum(group.costs)
    # Only the long premise is cut; the hypothesis is whole at the end.
    assert [p.truncated for p in group.payloads] == [False] * 4 + [True] * 2
    hypothesis = tokenizer("This example is sports.", add_special_tokens=False)["input_ids"]
    long_pair = group.payloads[4].input_ids
    assert len(long_pair) == MAX_LEN
    assert long_pair[-len(hypothesis) - 1 : -1] == hypothesis


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_option_names_it(adapters: dict[str, NLIZeroShotAdapter]) -> None:
    with pytest.raises(InvalidInput, match=r"unknown option 'treshold' for model tiny/bert-enc"):
        extract_call(adapters["bert-enc"], TEXTS, LABELS, {"treshold": 0.5})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"multi_label": "yes"}, r"option 'multi_label' must be true or false"),
        ({"hypothesis_template": 3}, r"option 'hypothesis_template' must be a string"),
        ({"hypothesis_template": "About {label}."}, r"'hypothesis_template' uses placeholder"),
        ({"hypothesis_template": "No placeholder."}, r"must contain \{\} exactly once"),
        ({"hypothesis_template": "{} or {}"}, r"must contain \{\} exactly once"),
    ],
)
def test_bad_options_are_invalid_input(
    adapters: dict[str, NLIZeroShotAdapter], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        extract(adapters["bert-enc"], TEXTS[:1], LABELS, options)


def test_labels_are_required_and_schemas_refused(adapters: dict[str, NLIZeroShotAdapter]) -> None:
    adapter = adapters["bert-enc"]
    with pytest.raises(InvalidInput, match="labels are required"):
        extract_call(adapter, TEXTS, [])
    with pytest.raises(InvalidInput, match="cannot fill an output_schema"):
        resolve_extract(
            adapter.spec,
            [InputItem(text="x")],
            ExtractParams(labels=["a"], output_schema={"type": "object"}),
            support=adapter.extract_support,
            accepted_options=adapter.extract_options,
            limits=10,
        )


def test_a_hypothesis_leaving_no_room_is_input_too_long(
    adapters: dict[str, NLIZeroShotAdapter],
) -> None:
    label = " ".join(["very long label"] * 30)
    with pytest.raises(InputTooLong, match=r"hypothesis of label .* max_sequence_length 64"):
        extract(adapters["bert-enc"], TEXTS[:1], [label])


def test_a_model_without_an_entailment_label_fails_to_load(tmp_path: Path) -> None:
    folder = build_bert_classifier(tmp_path / "plain", num_labels=3, model_max_length=MAX_LEN)
    with pytest.raises(CatalogError, match=r"'entailment' label.*LABEL_0, LABEL_1, LABEL_2"):
        load_adapter(spec_for(folder, "tiny/no-entailment"))


# ---- lifecycle ---------------------------------------------------------------------------------
def test_warm_up_runs(pipelines: dict[str, Any], adapters: dict[str, NLIZeroShotAdapter]) -> None:
    adapter = adapters["deberta-2way"]
    warm_up(adapter, adapter.spec)
    (call,) = list(sample_calls(adapter.spec, type(adapter)))
    got = run_inline(job_for(adapter, call))
    assert_same(got, zero_shot_reference(pipelines["deberta-2way"], [TEXT], ["person", "location"]))


def test_memory_and_unload(folders: dict[str, Path]) -> None:
    local = as_nli(load_adapter(spec_for(folders["bert-enc"], "tiny/mem")))
    assert local.memory_bytes() == parameter_bytes(local.model) > 0
    local.unload()
    assert local.memory_bytes() == 0


def test_catalog_entry() -> None:
    name = "MoritzLaurer/deberta-v3-base-zeroshot-v2.0"
    spec = load_catalog([BUILTIN_CATALOG_DIR])[name]
    assert spec.adapter == "nli_zero_shot"
    assert spec.hf_id == name
    assert spec.max_sequence_length == 512
    assert set(spec.outputs) == {"json"}
    assert spec.tasks == ("extract",)
    assert set(spec.tasks) <= tasks_of(NLIZeroShotAdapter)
    assert set(spec.profile(None).options) <= NLIZeroShotAdapter.extract_options
    create_adapter(spec).check_spec()
