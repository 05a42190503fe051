"""Models that cannot be served fail their load with MODEL_LOAD_FAILED over gRPC, the message
saying why (never silently wrong results, never INTERNAL): a sentence-transformers module the
dense adapter cannot run, a classifier that is not a reranker, a profile option value only the
family checks. The first request answers MODEL_LOADING (the load starts in the background)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from sie_sdk.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2,
    extract_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

from tests.server_utils import error_info, serving, write_catalog_entry
from tests.tiny_models import classifiers, dense


def _with_lstm(root: Path) -> Path:
    """A real sentence-transformers save, with an LSTM module added to modules.json."""
    folder = root / "lstm"
    shutil.copytree(dense.build_tiny_dense(root / "st"), folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(
        2, {"idx": 9, "name": "9", "path": "9_LSTM", "type": "sentence_transformers.models.LSTM"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


async def _first_failure(call: Any) -> grpc.aio.AioRpcError:
    """Call until the background load ends; the first answer must be MODEL_LOADING."""
    reasons: list[str] = []
    for _ in range(400):
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            reasons.append(error_info(exc)[0])
            if reasons[-1] != "MODEL_LOADING":
                assert reasons[0] == "MODEL_LOADING"
                return exc
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the broken model served a request")
    pytest.fail(f"the load never ended: {reasons[-3:]}")


async def test_unservable_models_fail_their_load_with_a_reason(tmp_path: Path) -> None:
    entries: list[dict[str, Any]] = [
        {
            "name": "broken/lstm",
            "adapter": "dense",
            "weights_path": str(_with_lstm(tmp_path)),
            "max_sequence_length": 32,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
        {
            "name": "broken/two-labels",
            "adapter": "cross_encoder",
            "weights_path": str(classifiers.build_bert_classifier(tmp_path / "two", num_labels=2)),
            "max_sequence_length": 32,
            "outputs": {"score": {}},
        },
        {
            "name": "broken/nli-option",
            "adapter": "nli_zero_shot",
            "weights_path": str(
                classifiers.build_bert_classifier(
                    tmp_path / "nli",
                    num_labels=3,
                    labels=["entailment", "neutral", "contradiction"],
                )
            ),
            "max_sequence_length": 32,
            "outputs": {"json": {}},
            "profiles": {"default": {"options": {"multi_label": "yes"}}},
        },
    ]
    for entry in entries:
        write_catalog_entry(tmp_path / "catalog", entry)
    async with serving([tmp_path / "catalog"]) as handle:
        encode = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        score = score_pb2_grpc.ScoreServiceStub(handle.channel)
        extract = extract_pb2_grpc.ExtractServiceStub(handle.channel)

        def encode_call(model: str) -> Any:
            return lambda: encode.Encode(
                encode_pb2.EncodeRequest(model=model, items=[common_pb2.Item(text="hello")])
            )

        cases = [
            (encode_call("broken/lstm"), "sentence_transformers.models.LSTM"),
            (
                lambda: score.Score(
                    score_pb2.ScoreRequest(
                        model="broken/two-labels",
                        query=common_pb2.Item(text="q"),
                        items=[common_pb2.Item(text="d")],
                    )
                ),
                "num_labels=2",
            ),
            (
                lambda: extract.Extract(
                    extract_pb2.ExtractRequest(
                        model="broken/nli-option",
                        items=[common_pb2.Item(text="hello")],
                        params=extract_pb2.ExtractParams(labels=["greeting"]),
                    )
                ),
                "option 'multi_label' must be true or false",
            ),
        ]
        for call, fragment in cases:
            failure = await _first_failure(call)
            assert failure.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert fragment in (failure.details() or ""), failure.details()
            reason, metadata, retry = error_info(failure)
            assert reason == "MODEL_LOAD_FAILED"
            assert retry is None
            assert metadata["model"].startswith("broken/")


async def test_a_failed_load_counts_its_attempts_and_leaves_other_models_serving(
    tmp_path: Path,
) -> None:
    """MODEL_LOAD_FAILED says why and how many loads were tried; after ``--load-retry-s`` the
    next request loads it again (MODEL_LOADING, then a second failure); a healthy model beside
    it serves throughout."""
    write_catalog_entry(
        tmp_path / "catalog",
        {
            "name": "broken/lstm",
            "adapter": "dense",
            "weights_path": str(_with_lstm(tmp_path)),
            "max_sequence_length": 32,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
    )
    write_catalog_entry(
        tmp_path / "catalog",
        {
            "name": "healthy/dense",
            "adapter": "dense",
            "weights_path": str(dense.build_tiny_dense(tmp_path / "healthy")),
            "max_sequence_length": 32,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        },
    )
    async with serving(
        [tmp_path / "catalog"], preload=["healthy/dense"], load_retry_s=0.5
    ) as handle:
        encode = encode_pb2_grpc.EncodeServiceStub(handle.channel)

        def call(model: str) -> Any:
            return encode.Encode(
                encode_pb2.EncodeRequest(model=model, items=[common_pb2.Item(text="hello")])
            )

        first = await _first_failure(lambda: call("broken/lstm"))
        assert "(1 attempt)" in (first.details() or ""), first.details()
        assert "sentence_transformers.models.LSTM" in (first.details() or "")
        assert (await call("healthy/dense")).items[0].dense.dims == dense.HIDDEN
        # Within the retry window the failure is answered at once, without a new load.
        again = await _first_failure_now(lambda: call("broken/lstm"))
        assert "(1 attempt)" in (again.details() or ""), again.details()
        await asyncio.sleep(0.6)
        second = await _first_failure(lambda: call("broken/lstm"))
        assert "(2 attempts)" in (second.details() or ""), second.details()
        assert error_info(second)[0] == "MODEL_LOAD_FAILED"
        assert (await call("healthy/dense")).items[0].dense.dims == dense.HIDDEN


async def _first_failure_now(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call()
    assert error_info(failed.value)[0] == "MODEL_LOAD_FAILED"
    return failed.value
