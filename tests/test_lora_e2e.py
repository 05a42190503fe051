"""LoRA adapters served end to end: a tiny dense model with two random peft adapters, over gRPC,
the bridge and the SDK. Each adapter's vectors equal peft's ``PeftModel`` in process; the first
request for an adapter sees LORA_LOADING (retryable) and a retry gets the result; mixed traffic
never mixes adapters in a forward pass; past ``--max-loras-per-model`` adapters are evicted and
reload; refusals name what is wrong."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import safetensors.torch
import torch
from google.protobuf.struct_pb2 import Struct
from sie_sdk import Item, SIEClient
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, score_pb2, score_pb2_grpc
from sie_server.engine import heap
from sie_server.engine.model_thread import BatchJob, ModelThread

from tests.bridge_utils import JSON_HEADERS, bridged
from tests.server_utils import HANG_GUARD_S, ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import classifiers, dense
from tests.tiny_models.entries import DENSE_OUTPUTS, SCORE_OUTPUTS, entry
from tests.tiny_models.lora import build_lora, cosines, reference_lora

TEXTS = [
    "Hello, world!",
    "A tenant's fine-tuned adapter changes the attention projections only.",
    "x",
    "Tokenization latency matters when many short queries arrive at once.",
]
MODEL = "tiny/lora"
MISSING = "/nonexistent/lora-adapter"


def saved_bytes(folder: Path) -> int:
    tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Built:
    """The saved base model, its adapters (a, b) and each one's reference vectors of TEXTS."""

    def __init__(self, root: Path) -> None:
        self.base = dense.build_tiny_dense(root / "dense")
        self.loras = {n: build_lora(root / n, self.base, seed=s) for n, s in (("a", 21), ("b", 22))}
        self.want: dict[str | None, np.ndarray] = {
            n: reference_lora(self.base, path, TEXTS) for n, path in self.loras.items()
        }
        self.want[None] = dense.reference_st(self.base, TEXTS)
        #: Bytes of each adapter's weights, as saved (fp32, as the served model).
        self.lora_bytes = {n: saved_bytes(path) for n, path in self.loras.items()}

    def lora_id(self, name: str | None) -> str | None:
        return None if name is None else str(self.loras[name])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("lora-e2e"))


def catalog(built: Built, root: Path) -> Path:
    """The served models: three names over the same weights (each has its own adapters, so each
    test sees a first load), and a reranker, a family without LoRA."""
    folder = root / "catalog"
    ids = [str(p) for p in built.loras.values()]
    for name, allowed in (
        (MODEL, [*ids, MISSING]),
        ("tiny/lora-http", ids),
        ("tiny/lora-sdk", ids),
    ):
        write_catalog_entry(
            folder, entry(name, "dense", built.base, DENSE_OUTPUTS, lora={"allowed": allowed})
        )
    profiled = entry(
        "tiny/lora-profile",
        "dense",
        built.base,
        DENSE_OUTPUTS,
        profiles={"default": {"options": {"lora_id": ids[0]}}, "plain": {}},
    )
    write_catalog_entry(folder, profiled)
    reranker = classifiers.build_bert_classifier(root / "reranker")
    write_catalog_entry(folder, entry("tiny/reranker", "cross_encoder", reranker, SCORE_OUTPUTS))
    return folder


MODELS = [MODEL, "tiny/lora-http", "tiny/lora-sdk", "tiny/lora-profile", "tiny/reranker"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerHandle]:
    folder = catalog(built, tmp_path_factory.mktemp("lora-catalog"))
    async with serving([folder], preload=MODELS, max_items_per_request=16) as handle:
        yield handle


def request(model: str, texts: Sequence[str], lora_id: str | None) -> encode_pb2.EncodeRequest:
    req = encode_pb2.EncodeRequest(model=model, items=[common_pb2.Item(text=t) for t in texts])
    if lora_id is not None:
        req.params.options.update({"lora_id": lora_id})
    return req


def struct(values: dict[str, Any]) -> Struct:
    options = Struct()
    options.update(values)
    return options


def vectors(reply: encode_pb2.EncodeResponse) -> np.ndarray:
    return np.stack([from_tensor(item.dense.values) for item in reply.items])


async def encode_retrying(
    channel: grpc.aio.Channel, model: str, lora_id: str | None, texts: Sequence[str] = TEXTS
) -> tuple[np.ndarray, list[str]]:
    """Encode, retrying LORA_LOADING as a client does (a hang guard bounds it); the vectors and
    the reasons of the refusals seen on the way."""
    stub: Any = encode_pb2_grpc.EncodeServiceStub(channel)
    refusals: list[str] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            return vectors(await stub.Encode(request(model, texts, lora_id))), refusals
        except grpc.aio.AioRpcError as exc:
            reason = error_info(exc)[0]
            if reason != "LORA_LOADING" or time.monotonic() > deadline:
                raise
            refusals.append(reason)
            await asyncio.sleep(0.02)


def close_to(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(cosines(got, want).min() >= 0.9999)


async def test_first_request_loads_then_each_adapter_equals_peft(
    server: ServerHandle, built: Built
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    for name in ("a", "b"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Encode(request(MODEL, TEXTS, built.lora_id(name)))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        reason, metadata, retry_s = error_info(refused.value)
        lora = built.lora_id(name)
        assert (reason, metadata, retry_s) == ("LORA_LOADING", {"model": MODEL, "lora": lora}, 1.0)
        assert str(built.loras[name]) in str(refused.value.details())
        got, _ = await encode_retrying(server.channel, MODEL, built.lora_id(name))
        assert close_to(got, built.want[name])
        assert not close_to(got, built.want[None])  # the adapter changes the vectors
    base, refusals = await encode_retrying(server.channel, MODEL, None)
    assert refusals == []  # the base model never waits for adapters
    assert np.allclose(base, built.want[None], atol=1e-5)


async def test_a_profiles_adapter_loads_with_the_model(server: ServerHandle, built: Built) -> None:
    got, refusals = await encode_retrying(server.channel, "tiny/lora-profile", None)
    assert refusals == []  # loaded (and warmed up) with the model
    assert close_to(got, built.want["a"])
    plain, _ = await encode_retrying(server.channel, "tiny/lora-profile:plain", None)
    assert np.allclose(plain, built.want[None], atol=1e-5)


async def test_score_runs_through_the_adapter(server: ServerHandle, built: Built) -> None:
    await encode_retrying(server.channel, MODEL, built.lora_id("a"))
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    reply = await stub.Score(
        score_pb2.ScoreRequest(
            model=MODEL,
            query=common_pb2.Item(text=TEXTS[0]),
            items=[common_pb2.Item(id=str(i), text=t) for i, t in enumerate(TEXTS[1:], 1)],
            options=struct({"lora_id": built.lora_id("a")}),
        )
    )
    want = built.want["a"]
    expected = {str(i): float(want[0] @ want[i]) for i in range(1, len(TEXTS))}
    assert {s.item_id: s.score for s in reply.scores} == pytest.approx(expected, abs=1e-4)


async def test_mixed_concurrent_traffic_never_mixes_adapters(
    server: ServerHandle, built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    for loaded in ("a", "b"):
        await encode_retrying(server.channel, MODEL, built.lora_id(loaded))
    batches: list[tuple[set[Any], int]] = []  # (the items' batch keys, how many items)
    run_batch = ModelThread.run_batch

    def recording(self: ModelThread, job: BatchJob, **how: Any) -> None:
        batches.append(({item.key for item in job.batch.items}, len(job.batch.items)))
        run_batch(self, job, **how)

    monkeypatch.setattr(ModelThread, "run_batch", recording)
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    names: tuple[str | None, ...] = (None, "a", "b")
    calls = [(name, i % len(TEXTS)) for i in range(16) for name in names]
    replies = await asyncio.gather(
        *(stub.Encode(request(MODEL, [TEXTS[t]], built.lora_id(n))) for n, t in calls)
    )
    for (name, text), reply in zip(calls, replies, strict=True):
        assert close_to(vectors(reply), built.want[name][text : text + 1]), (name, text)
    keys = [batch_keys for batch_keys, _ in batches]
    assert all(len(k) == 1 for k in keys)  # one batch key, so one adapter, per forward pass
    assert len(set().union(*keys)) == 3  # base, a and b have different keys
    sizes = [size for _, size in batches]
    assert max(sizes) > 1  # requests did share forward passes


async def test_bridge_answers_503_with_retry_after_then_the_result(
    server: ServerHandle, built: Built
) -> None:
    body = {"items": [{"text": TEXTS[1]}], "params": {"options": {"lora_id": built.lora_id("a")}}}
    async with bridged(server.address) as http:

        async def post() -> tuple[int, Any, Any]:
            async with http.session.post(
                "/v1/encode/tiny/lora-http", json=body, headers=JSON_HEADERS
            ) as response:
                return response.status, await response.json(), response.headers

        status, answer, headers = await post()
        assert (status, answer["detail"]["code"]) == (503, "LORA_LOADING")
        assert answer["detail"]["lora"] == built.lora_id("a")
        assert headers["Retry-After"] == "1"
        deadline = time.monotonic() + HANG_GUARD_S
        while status == 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            status, answer, headers = await post()
    assert status == 200
    got = np.asarray([answer["items"][0]["dense"]["values"]], dtype=np.float32)
    assert close_to(got, built.want["a"][1:2])


async def test_sdk_retries_through_loading(server: ServerHandle, built: Built) -> None:
    residency = server.running.registry.entry("tiny/lora-sdk").loras
    assert residency is not None
    lora_id = built.lora_id("b")
    assert lora_id not in residency.slots  # so the first attempt is refused with LORA_LOADING

    def encode() -> Any:
        with SIEClient(server.address) as client:
            return client.encode("tiny/lora-sdk", Item(text=TEXTS[3]), options={"lora_id": lora_id})

    result = await asyncio.to_thread(encode)
    assert close_to(np.asarray([result["dense"]]), built.want["b"][3:4])


async def test_refusals_name_what_is_wrong(server: ServerHandle, built: Built) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Encode(request(MODEL, TEXTS, "/etc"))
    assert error_info(refused.value)[0] == "INVALID_INPUT"
    assert "'/etc' is not allowed for model tiny/lora" in str(refused.value.details())

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await score_pb2_grpc.ScoreServiceStub(server.channel).Score(
            score_pb2.ScoreRequest(
                model="tiny/reranker",
                query=common_pb2.Item(text="q"),
                items=[common_pb2.Item(text="d")],
                options=struct({"lora_id": built.lora_id("a")}),
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value)[0] == "INVALID_INPUT"
    assert "tiny/reranker cannot take LoRA adapters (option 'lora_id'" in str(
        refused.value.details()
    )

    await missing_adapter_fails(stub)


async def missing_adapter_fails(stub: Any) -> None:
    """The missing adapter: LORA_LOADING while its load runs, then MODEL_LOAD_FAILED naming it
    and why, without loading again."""
    refusals: list[str] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Encode(request(MODEL, TEXTS, MISSING))
        reason = error_info(refused.value)[0]
        if reason != "LORA_LOADING" or time.monotonic() > deadline:
            break
        refusals.append(reason)
        await asyncio.sleep(0.02)
    assert refusals  # the load ran in the background first
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason == "MODEL_LOAD_FAILED"
    message = str(refused.value.details())
    assert f"loading LoRA adapter {MISSING!r} of model {MODEL} failed" in message
    assert "adapter_config.json" in message
    assert "loads it again" in message


async def test_one_resident_adapter_evicts_and_reloads(built: Built, tmp_path: Path) -> None:
    folder = tmp_path / "catalog"
    ids = [str(p) for p in built.loras.values()]
    write_catalog_entry(
        folder, entry(MODEL, "dense", built.base, DENSE_OUTPUTS, lora={"allowed": ids})
    )
    async with serving([folder], preload=[MODEL], max_loras_per_model=1) as handle:
        model = handle.running.registry.entry(MODEL)
        residency = model.loras
        assert residency is not None
        base_bytes = model.memory_bytes
        for name in ("a", "b", "a", "b"):
            got, refusals = await encode_retrying(handle.channel, MODEL, built.lora_id(name))
            assert refusals  # evicted by the other one, so loaded again
            assert close_to(got, built.want[name])
            await asyncio.sleep(0)  # the eviction is queued on the model thread
            assert list(residency.slots) == [built.lora_id(name)]
            base, _ = await encode_retrying(handle.channel, MODEL, None)
            assert np.allclose(base, built.want[None], atol=1e-5)
            # The memory budget counts the resident adapter, and only it (the evicted one's
            # bytes are released: both adapters have the same shapes).
            assert model.memory_bytes == base_bytes + built.lora_bytes[name]


def lora_module(handle: ServerHandle, lora_id: str | None) -> torch.nn.Module:
    """One of ``lora_id``'s LoRA layers inside the served model."""
    adapter: Any = handle.running.registry.entry(MODEL).adapter
    name = adapter._loras.names[lora_id]
    return next(m for n, m in adapter._loras.peft.named_modules() if n.endswith(f"lora_A.{name}"))


async def test_an_adapter_frozen_by_a_model_load_is_collected_when_evicted(
    built: Built, tmp_path: Path
) -> None:
    """A model's load freezes the heap (engine/heap.py): an adapter resident then, caught in a
    reference cycle, once stayed in memory after its eviction until a model was evicted. An
    adapter that arrived after the last settle is left to the collector, with no full
    collection."""
    folder = tmp_path / "catalog"
    ids = [str(p) for p in built.loras.values()]
    write_catalog_entry(
        folder, entry(MODEL, "dense", built.base, DENSE_OUTPUTS, lora={"allowed": ids})
    )
    async with serving([folder], preload=[MODEL], max_loras_per_model=1) as handle:
        await encode_retrying(handle.channel, MODEL, built.lora_id("a"))
        settled = heap.epoch()
        await encode_retrying(handle.channel, MODEL, built.lora_id("b"))  # evicts a
        await asyncio.sleep(0.1)
        assert heap.epoch() == settled  # a arrived after the settle: no reclaim

        module = lora_module(handle, built.lora_id("b"))
        module.cycle = [module]  # only the cyclic collector can free it now
        loop, freed = asyncio.get_running_loop(), asyncio.Event()
        gone = weakref.ref(module, lambda _: loop.call_soon_threadsafe(freed.set))
        del module
        heap.settle()  # as another model's load does: b's layers are frozen
        gc.collect()
        assert gone() is not None
        await encode_retrying(handle.channel, MODEL, built.lora_id("a"))  # evicts b
        await asyncio.wait_for(freed.wait(), HANG_GUARD_S)  # collected off the event loop
        assert gc.get_freeze_count() > 0  # settled again after the collection
        got, _ = await encode_retrying(handle.channel, MODEL, built.lora_id("a"))
        assert close_to(got, built.want["a"])
