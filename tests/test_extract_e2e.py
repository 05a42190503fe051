"""Extract over gRPC: GLiNER entities, GLiClass and NLI zero-shot classifications on tiny
real-architecture checkpoints, each against its reference library computed in-process; every
result list present, ids, batching across calls, and every error path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2
from sie_sdk.v1 import common_pb2, extract_pb2, extract_pb2_grpc

from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import classifiers, gliclass, gliner
from tests.tiny_models.entries import JSON_OUTPUTS, entry

# transformers' DeBERTa-v2 module (imported by gliclass and gliner) uses torch.jit.script,
# deprecated in torch 2.13; the models load in the server's model thread.
pytestmark = pytest.mark.filterwarnings(classifiers.DEBERTA_JIT_WARNING)

TEXTS = [
    "Ada Lovelace met Charles Babbage in London in 1833.",
    "The new phone has a great camera but the battery is weak.",
]
LABELS = ["person", "location", "date"]
CLASSES = ["technology", "history", "sports"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def catalog_dir(root: Path) -> Path:
    entries: list[dict[str, Any]] = [
        entry("tiny/gliner", "gliner", gliner.build_tiny_gliner(root / "gliner"), JSON_OUTPUTS),
        entry(
            "tiny/gliclass",
            "gliclass",
            gliclass.build_tiny_gliclass(root / "gliclass"),
            JSON_OUTPUTS,
            max_sequence_length=64,
        ),
        {
            "name": "tiny/nli",
            "adapter": "nli_zero_shot",
            "weights_path": str(
                classifiers.build_bert_classifier(
                    root / "nli",
                    num_labels=3,
                    labels=["entailment", "neutral", "contradiction"],
                    model_max_length=64,
                )
            ),
            "max_sequence_length": 64,
            "outputs": {"json": {}},
        },
    ]
    for item in entries:
        write_catalog_entry(root / "catalog", item)
    return root / "catalog"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    preload = ["tiny/gliner", "tiny/gliclass", "tiny/nli"]
    async with serving([catalog_dir], preload=preload, max_items_per_request=8) as handle:
        yield handle


@pytest.fixture
def stub(server: ServerHandle) -> extract_pb2_grpc.ExtractServiceStub:
    return extract_pb2_grpc.ExtractServiceStub(server.channel)


def extract_request(
    model: str,
    texts: Sequence[str] = TEXTS,
    labels: Sequence[str] = LABELS,
    *,
    ids: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    **params: Any,
) -> extract_pb2.ExtractRequest:
    req = extract_pb2.ExtractRequest(
        model=model,
        items=[common_pb2.Item(id=ids[i] if ids else "", text=t) for i, t in enumerate(texts)],
        params=extract_pb2.ExtractParams(labels=list(labels), **params),
    )
    if options:
        req.params.options.update(options)
    return req


def classes_of(result: extract_pb2.ExtractResult) -> list[tuple[str, float]]:
    return [(c.label, c.score) for c in result.classifications]


# ---- GLiNER ----------------------------------------------------------------------------------------


async def test_gliner_entities_equal_predict_entities(stub: Any, root: Path) -> None:
    reference = gliner.load_reference(root / "gliner" / "model")
    response = await stub.Extract(
        extract_request("tiny/gliner", ids=["first", ""], options={"threshold": 0.3})
    )
    assert [item.id for item in response.items] == ["first", "item-1"]
    found = 0
    for text, item in zip(TEXTS, response.items, strict=True):
        want = reference.predict_entities(text, LABELS, threshold=0.3)
        got = [(e.start, e.end, e.label) for e in item.entities]
        assert got == [(w["start"], w["end"], w["label"]) for w in want]
        for entity, w in zip(item.entities, want, strict=True):
            assert entity.text == text[entity.start : entity.end] == w["text"]
            assert entity.score == pytest.approx(w["score"], abs=1e-4)
        assert list(item.classifications) == []
        assert list(item.relations) == []
        assert list(item.objects) == []
        found += len(want)
    assert found > 0, "the tiny model must find something at this threshold"


# ---- GLiClass and NLI zero-shot -------------------------------------------------------------------


async def test_gliclass_classifications_equal_the_pipeline(stub: Any, root: Path) -> None:
    pipeline = gliclass.reference_pipeline(root / "gliclass" / "model", 64)
    want = gliclass.reference_scores(pipeline, TEXTS, CLASSES, "single-label")
    response = await stub.Extract(extract_request("tiny/gliclass", labels=CLASSES))
    for item, scores in zip(response.items, want, strict=True):
        got = classes_of(item)
        assert [label for label, _ in got] == sorted(scores, key=lambda k: -scores[k])
        for label, score in got:
            assert score == pytest.approx(scores[label], abs=1e-5)
        assert list(item.entities) == []


async def test_gliclass_overflow_error_has_the_spec_message(stub: Any) -> None:
    long_text = " ".join(["battery"] * 200)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Extract(
            extract_request(
                "tiny/gliclass",
                [TEXTS[0], long_text],
                CLASSES,
                options={"overflow_policy": "error"},
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value)[0] == "INPUT_TOO_LONG"
    details = caught.value.details() or ""
    assert details.startswith("Item 1: observed ")
    assert "exceeds context cap 64 for tiny/gliclass" in details
    truncated = await stub.Extract(
        extract_request(
            "tiny/gliclass", [long_text], CLASSES, options={"overflow_policy": "truncate_text"}
        )
    )
    assert sorted(label for label, _ in classes_of(truncated.items[0])) == sorted(CLASSES)


@pytest.mark.parametrize("multi_label", [False, True])
async def test_nli_zero_shot_equals_the_transformers_pipeline(
    stub: Any, root: Path, multi_label: bool
) -> None:
    pipeline = classifiers.zero_shot_pipeline(root / "nli")
    want = classifiers.zero_shot_reference(pipeline, TEXTS, CLASSES, multi_label=multi_label)
    response = await stub.Extract(
        extract_request("tiny/nli", labels=CLASSES, options={"multi_label": multi_label})
    )
    for item, ref in zip(response.items, want, strict=True):
        got = classes_of(item)
        assert [label for label, _ in got] == [label for label, _ in ref]
        assert [score for _, score in got] == pytest.approx([s for _, s in ref], abs=1e-5)


# ---- batching across calls --------------------------------------------------------------------------


async def test_concurrent_extract_calls_share_forward_passes(
    stub: Any, server: ServerHandle
) -> None:
    metrics = server.running.registry.metrics
    for model, labels in (("tiny/gliner", LABELS), ("tiny/nli", CLASSES)):
        before = metrics.counter("sie_batches_total", model=model, status="ok")
        alone = await stub.Extract(extract_request(model, TEXTS[:1], labels))
        calls = [stub.Extract(extract_request(model, TEXTS[:1], labels)) for _ in range(32)]
        responses = await asyncio.gather(*calls)
        passes = metrics.counter("sie_batches_total", model=model, status="ok") - before - 1
        assert passes < len(calls), f"{model}: {passes} forward passes for {len(calls)} calls"
        for response in responses:  # the same results, whatever shared their forward pass
            for got, want in zip(response.items, alone.items, strict=True):
                assert [(e.start, e.end, e.label) for e in got.entities] == [
                    (e.start, e.end, e.label) for e in want.entities
                ]
                assert [c.label for c in got.classifications] == [
                    c.label for c in want.classifications
                ]
                scores = [e.score for e in got.entities] + [c.score for c in got.classifications]
                expected = [e.score for e in want.entities] + [
                    c.score for c in want.classifications
                ]
                assert scores == pytest.approx(expected, abs=1e-5), model


# ---- errors -----------------------------------------------------------------------------------------


def _with_schema() -> extract_pb2.ExtractRequest:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"name": {"type": "string"}}})
    return extract_request("tiny/gliner", output_schema=schema)


@pytest.mark.parametrize(
    ("make", "reason", "fragment"),
    [
        (lambda: extract_request("tiny/gliner", labels=[]), "INVALID_INPUT", "labels are required"),
        (_with_schema, "INVALID_INPUT", "cannot fill an output_schema"),
        (
            lambda: extract_request("tiny/gliner", options={"threshold": "high"}),
            "INVALID_INPUT",
            "option 'threshold' must be a number",
        ),
        (
            lambda: extract_request("tiny/gliner", options={"flat": True}),
            "INVALID_INPUT",
            "unknown option 'flat'",
        ),
        (
            lambda: extract_request("tiny/gliclass", options={"overflow_policy": "cut"}),
            "INVALID_INPUT",
            "overflow_policy",
        ),
        (
            lambda: extract_request("tiny/nli", options={"hypothesis_template": "It is {label}."}),
            "INVALID_INPUT",
            "option 'hypothesis_template' uses placeholder {label}",
        ),
        (lambda: extract_request("tiny/nli", []), "INVALID_INPUT", "items must not be empty"),
        (
            lambda: extract_request("tiny/gliner", instruction="Find people"),
            "INVALID_INPUT",
            "does not take an instruction",
        ),
        (lambda: extract_request("tiny/nli", ["t"] * 9), "INVALID_INPUT", "exceed the limit of 8"),
        (
            lambda: extract_request("tiny/gliner", labels=[f"label {i}" for i in range(5000)]),
            "INVALID_INPUT",
            "5000 labels exceed the limit of 256",
        ),
        (
            lambda: extract_pb2.ExtractRequest(
                model="tiny/nli",
                items=[common_pb2.Item(id="no-text")],
                params=extract_pb2.ExtractParams(labels=["a"]),
            ),
            "INVALID_INPUT",
            "item 0 has no text",
        ),
    ],
)
async def test_invalid_extract_requests(stub: Any, make: Any, reason: str, fragment: str) -> None:
    req = make()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Extract(req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (caught.value.details() or "")
    got_reason, metadata, retry = error_info(caught.value)
    assert got_reason == reason
    assert metadata == {"model": req.model}
    assert retry is None


async def test_extract_on_an_embedding_model_is_invalid(tmp_path: Path) -> None:
    from tests.tiny_models import dense

    write_catalog_entry(
        tmp_path / "catalog",
        {
            "name": "tiny/dense",
            "adapter": "dense",
            "weights_path": str(dense.build_tiny_dense(tmp_path / "dense")),
            "max_sequence_length": 32,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
    )
    async with serving([tmp_path / "catalog"]) as handle:
        stub = extract_pb2_grpc.ExtractServiceStub(handle.channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Extract(extract_request("tiny/dense"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not support extract (it supports encode, score)" in (caught.value.details() or "")
    assert error_info(caught.value)[0] == "INVALID_INPUT"
