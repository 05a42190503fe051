"""The SDK reference's examples, run literally by both clients over both transports against a real
server (gRPC) and bridge (HTTP) serving tiny models under the reference's model names: vectors equal
the gRPC stub's bit for bit, one item in gives one result and a list gives a list, scores come
sorted with ranks, entities carry offsets into the text, models and capacity, status messages,
context managers, client-side MaxSim equal to the server's, request splitting, images converted
and refused by a text model, and the URL choosing the transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from sie_sdk import Item, SIEAsyncClient, SIEClient
from sie_sdk.client._core import Prepared, smaller_bodies
from sie_sdk.client._transports.base import Kind, Operation
from sie_sdk.client._transports.grpc import AsyncGrpcTransport, GrpcTransport
from sie_sdk.client._transports.http import AsyncHttpTransport, HttpTransport
from sie_sdk.client.errors import RequestError, SIEError
from sie_sdk.scoring import maxsim
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2,
    extract_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

from tests.bridge_utils import BridgeHandle, bridged
from tests.sdk.conftest import CASES, Case, Sdk, call, make_sdk
from tests.server_utils import ServerHandle, fake_entry, serving, write_catalog_entry
from tests.tiny_models import bge_m3, classifiers, colbert, gliner
from tests.tiny_models.entries import BGE_M3_OUTPUTS, JSON_OUTPUTS, SCORE_OUTPUTS, entry

pytestmark = pytest.mark.filterwarnings(classifiers.DEBERTA_JIT_WARNING)

BGE_M3 = "BAAI/bge-m3"
RERANKER = "BAAI/bge-reranker-v2-m3"
GLINER = "urchade/gliner_multi-v2.1"
COLBERT = "jinaai/jina-colbert-v2"
PRELOAD = [BGE_M3, RERANKER, GLINER, COLBERT]
DOCS = [
    "ColBERT scores late interactions between token embeddings.",
    "The weather is sunny today.",
    "Late interaction keeps one vector per token.",
]


def lazy(case: Case) -> str:
    """A model no test loads before ``case``'s wait_for_capacity."""
    return f"lazy/{case.id}"


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdk-e2e")
    entries = [
        entry(
            BGE_M3,
            "bge_m3",
            bge_m3.build_tiny_bge_m3(root / "bge-m3"),
            BGE_M3_OUTPUTS,
            profiles={
                "default": {"output_types": ["dense"]},
                "sparse": {"output_types": ["sparse"]},
            },
        ),
        entry(
            RERANKER,
            "cross_encoder",
            classifiers.build_bert_classifier(root / "reranker"),
            SCORE_OUTPUTS,
            max_sequence_length=64,
        ),
        entry(GLINER, "gliner", gliner.build_tiny_gliner(root / "gliner"), JSON_OUTPUTS),
        entry(
            COLBERT,
            "colbert",
            colbert.build_tiny_colbert(root / "colbert"),
            {"multivector": {"dims": colbert.DIM, "similarity": "maxsim"}},
            load_options={"doc_maxlen": 48, "query_maxlen": 16},
        ),
        *(fake_entry(lazy(case)) for case in CASES),
    ]
    for item in entries:
        write_catalog_entry(root / "catalog", item)
    return root / "catalog"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=PRELOAD) as handle:
        yield handle


def url_of(case: Case, server: ServerHandle, http: BridgeHandle) -> str:
    return case.url(grpc_address=server.address, http_url=http.url)


# ---- the gRPC stubs, as the reference results -------------------------------------------------


async def stub_encode(
    server: ServerHandle, model: str, texts: Sequence[str], **params: Any
) -> encode_pb2.EncodeResponse:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    return await stub.Encode(
        encode_pb2.EncodeRequest(
            model=model,
            items=[common_pb2.Item(text=t) for t in texts],
            params=encode_pb2.EncodeParams(**params),
        )
    )


async def stub_score(
    server: ServerHandle, model: str, query: str, texts: Sequence[str]
) -> score_pb2.ScoreResponse:
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    return await stub.Score(
        score_pb2.ScoreRequest(
            model=model,
            query=common_pb2.Item(text=query),
            items=[common_pb2.Item(text=t) for t in texts],
        )
    )


def assert_same_result(got: dict[str, Any], want: encode_pb2.EncodeResult) -> None:
    """An SDK encode result equals the stub's, array by array, bit for bit and dtype."""
    present = {
        "dense": want.HasField("dense"),
        "sparse": want.HasField("sparse"),
        "multivector": want.HasField("multivector"),
    }
    assert {key for key in got if key in present} == {key for key, has in present.items() if has}
    assert got["id"] == want.id
    assert got["num_tokens"] == want.num_tokens > 0
    assert got["truncated"] is want.truncated
    pairs = []
    if want.HasField("dense"):
        pairs.append((got["dense"], from_tensor(want.dense.values)))
    if want.HasField("sparse"):
        pairs.append((got["sparse"]["indices"], from_tensor(want.sparse.indices)))
        pairs.append((got["sparse"]["values"], from_tensor(want.sparse.values)))
    if want.HasField("multivector"):
        pairs.append((got["multivector"], from_tensor(want.multivector.values)))
    for array, expected in pairs:
        assert isinstance(array, np.ndarray)
        assert array.dtype == expected.dtype
        assert array.shape == expected.shape
        assert np.array_equal(array, expected)


# ---- encode ------------------------------------------------------------------------------------


async def test_encode_examples_single_item_and_batch(sdk: Sdk, server: ServerHandle) -> None:
    # Single item
    result = await sdk("encode", BGE_M3, Item(text="Hello"))
    assert isinstance(result, dict)
    assert result["dense"][:5].shape == (5,)
    [want] = (await stub_encode(server, BGE_M3, ["Hello"])).items
    assert_same_result(result, want)
    assert result["dense"].dtype == np.float32

    # Batch
    results = await sdk("encode", BGE_M3, [Item(text="First"), Item(text="Second")])
    assert isinstance(results, list)
    assert len(results) == 2
    wants = (await stub_encode(server, BGE_M3, ["First", "Second"])).items
    for got, expected in zip(results, wants, strict=True):
        assert_same_result(got, expected)
    assert not np.array_equal(results[0]["dense"], results[1]["dense"])


async def test_encode_parameters_reach_the_server(sdk: Sdk, server: ServerHandle) -> None:
    texts = ["What is ColBERT?", "Sparse lexical weights " * 40]
    kwargs: dict[str, Any] = {
        "output_types": ["dense", "sparse", "multivector"],
        "instruction": "Represent this query:",
        "output_dtype": "float16",
        "is_query": True,
    }
    results = await sdk(
        "encode", BGE_M3, [Item(id=f"q{i}", text=t) for i, t in enumerate(texts)], **kwargs
    )
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    want = await stub.Encode(
        encode_pb2.EncodeRequest(
            model=BGE_M3,
            items=[common_pb2.Item(id=f"q{i}", text=t) for i, t in enumerate(texts)],
            params=encode_pb2.EncodeParams(**kwargs),
        )
    )
    assert [r["id"] for r in results] == ["q0", "q1"]
    for got, expected in zip(results, want.items, strict=True):
        assert_same_result(got, expected)
        assert got["dense"].dtype == np.float16
    assert results[1]["truncated"] is True, "the long text is cut to the context"
    assert results[0]["truncated"] is False
    # The parameters changed the result: a document encoding of the same text differs.
    plain = await sdk("encode", BGE_M3, Item(text=texts[0]), output_types=["dense"])
    assert set(plain) & {"dense", "sparse", "multivector"} == {"dense"}
    assert not np.array_equal(plain["dense"].astype(np.float16), results[0]["dense"])


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype", "width"),
    [("int8", np.int8, bge_m3.HIDDEN), ("binary", np.uint8, bge_m3.HIDDEN // 8)],
)
async def test_quantized_outputs_equal_the_stubs(
    sdk: Sdk, server: ServerHandle, dtype: str, numpy_dtype: type, width: int
) -> None:
    result = await sdk("encode", BGE_M3, Item(text="Hello"), output_dtype=dtype)
    [want] = (await stub_encode(server, BGE_M3, ["Hello"], output_dtype=dtype)).items
    assert_same_result(result, want)
    assert result["dense"].dtype == numpy_dtype
    assert result["dense"].shape == (width,)


async def test_profile_option_selects_outputs(sdk: Sdk) -> None:
    result = await sdk("encode", BGE_M3, Item(text="Search query"), options={"profile": "sparse"})
    assert set(result) & {"dense", "sparse", "multivector"} == {"sparse"}
    sparse = result["sparse"]
    default = make_sdk(sdk.case, sdk.client.config.base_url, options={"profile": "sparse"})
    try:
        by_default = await default("encode", BGE_M3, Item(text="Search query"))
    finally:
        await default.close()
    assert np.array_equal(by_default["sparse"]["values"], sparse["values"])
    assert "dense" not in by_default
    assert sparse["indices"].dtype == np.int32
    assert sparse["indices"].shape == sparse["values"].shape
    assert sparse["indices"].size > 0


# ---- score and extract ---------------------------------------------------------------------------


async def test_score_example(sdk: Sdk, server: ServerHandle) -> None:
    result = await sdk(
        "score",
        RERANKER,
        query=Item(text="What is Python?"),
        items=[Item(text="Python is..."), Item(text="Java is...")],
    )
    assert result["model"] == RERANKER
    scores = result["scores"]
    assert [e["rank"] for e in scores] == [0, 1]
    assert scores[0]["score"] >= scores[1]["score"]
    assert sorted(e["item_id"] for e in scores) == ["item-0", "item-1"]
    want = await stub_score(server, RERANKER, "What is Python?", ["Python is...", "Java is..."])
    assert [(e["item_id"], e["score"], e["rank"]) for e in scores] == [
        (w.item_id, w.score, w.rank) for w in want.scores
    ]
    lines = [f"Rank {e['rank']}: {e['score']:.3f}" for e in scores]
    assert lines[0].startswith("Rank 0: ")


async def test_score_echoes_ids(sdk: Sdk) -> None:
    items = [Item(id=f"doc-{i}", text=t) for i, t in enumerate(DOCS)]
    result = await sdk("score", RERANKER, Item(id="q-7", text="late interaction"), items)
    assert result["query_id"] == "q-7"
    assert sorted(e["item_id"] for e in result["scores"]) == ["doc-0", "doc-1", "doc-2"]
    values = [e["score"] for e in result["scores"]]
    assert values == sorted(values, reverse=True)


async def test_extract_example(sdk: Sdk, server: ServerHandle) -> None:
    text = "Tim Cook leads Apple."
    labels = ["person", "organization"]
    result = await sdk("extract", GLINER, Item(text=text), labels=labels)
    assert isinstance(result, dict)
    assert set(result) >= {"entities", "relations", "classifications", "objects"}
    # The tiny model is random: a low threshold makes sure there are spans to check.
    results = await sdk(
        "extract", GLINER, [Item(id="a", text=text)], labels=labels, options={"threshold": 0.05}
    )
    assert isinstance(results, list)
    [low] = results
    assert low["id"] == "a"
    assert low["entities"], "spans above a 0.05 threshold"
    for entity in low["entities"]:
        assert entity["label"] in labels
        assert text[entity["start"] : entity["end"]] == entity["text"]
        assert 0.0 <= entity["score"] <= 1.0
    stub = extract_pb2_grpc.ExtractServiceStub(server.channel)
    request = extract_pb2.ExtractRequest(
        model=GLINER,
        items=[common_pb2.Item(id="a", text=text)],
        params=extract_pb2.ExtractParams(labels=labels),
    )
    request.params.options.update({"threshold": 0.05})
    want = (await stub.Extract(request)).items[0]
    assert [(e["text"], e["label"], e["score"], e["start"], e["end"]) for e in low["entities"]] == [
        (e.text, e.label, e.score, e.start, e.end) for e in want.entities
    ]


# ---- models, capacity, status ----------------------------------------------------------------------


async def test_list_models_and_get_model(sdk: Sdk) -> None:
    models = {m["name"]: m for m in await sdk("list_models")}
    assert set(PRELOAD) <= set(models)
    m3 = models[BGE_M3]
    assert m3["loaded"] is True
    assert m3["state"] == "loaded"
    assert m3["inputs"] == ["text"]
    assert set(m3["outputs"]) == {"dense", "sparse", "multivector"}
    assert m3["dims"]["dense"] == bge_m3.HIDDEN
    assert m3["max_sequence_length"] == 128
    assert "encode" in m3["tasks"]
    assert any(p["is_default"] for p in m3["profiles"].values())
    assert models[RERANKER]["outputs"] == ["score"]
    assert await sdk("get_model", BGE_M3) == m3
    with pytest.raises(RequestError) as caught:
        await sdk("get_model", "no/such-model")
    assert (caught.value.code, caught.value.status_code) == ("MODEL_NOT_FOUND", 404)


async def test_models_read_the_same_over_both_transports(
    server: ServerHandle, http: BridgeHandle
) -> None:
    listed = []
    for case in CASES:
        client = make_sdk(case, url_of(case, server, http))
        try:
            listed.append(await client("list_models"))
        finally:
            await client.close()
    assert all(models == listed[0] for models in listed[1:])


async def test_get_capacity(sdk: Sdk) -> None:
    capacity = await sdk("get_capacity")
    assert capacity["ready"] is True
    assert capacity["device"] == "cpu"
    assert set(PRELOAD) <= set(capacity["loaded_models"])
    states = {m["name"]: m["state"] for m in capacity["models"]}
    assert all(states[name] == "loaded" for name in PRELOAD)


async def test_wait_for_capacity_loads_the_model(sdk: Sdk, server: ServerHandle) -> None:
    name = lazy(sdk.case)
    assert server.running.registry.entry(name).state.value != "loaded"
    capacity = await sdk("wait_for_capacity", model=name, timeout_s=60, poll_interval_s=0.1)
    assert server.running.registry.entry(name).state.value == "loaded"
    assert capacity["ready"] is True
    assert name in capacity["loaded_models"]


async def test_watch_status_yields_the_spec_messages(sdk: Sdk) -> None:
    messages = await sdk.statuses(2)
    assert len(messages) == 2
    keys = {
        "timestamp",
        "gpu",
        "loaded_models",
        "server",
        "gpus",
        "models",
        "counters",
        "histograms",
    }
    for message in messages:
        assert keys <= set(message)
        assert set(PRELOAD) <= set(message["loaded_models"])
        assert {"version", "uptime_seconds", "pid"} <= set(message["server"])
        model = next(m for m in message["models"] if m["name"] == BGE_M3)
        assert {"state", "device", "memory_bytes", "queue_depth", "queue_pending_items"} <= set(
            model
        )
    assert messages[1]["timestamp"] >= messages[0]["timestamp"]


# ---- lifecycle ---------------------------------------------------------------------------------------


async def test_context_managers_close_the_transport(
    server: ServerHandle, http: BridgeHandle
) -> None:
    for case in CASES:
        url = url_of(case, server, http)
        if case.flavor == "async":
            async with SIEAsyncClient(url) as async_client:
                result: Any = await async_client.encode(BGE_M3, Item(text="Hello"))
            with pytest.raises(SIEError, match="closed") as closed:
                await async_client.list_models()
            assert closed.value.code == "CLIENT_CLOSED"
            transport: Any = async_client._transport
        else:

            def run(url: str = url) -> tuple[Any, SIEClient]:
                with SIEClient(url) as client:
                    return client.encode(BGE_M3, Item(text="Hello")), client

            result, sync_client = await asyncio.to_thread(run)
            with pytest.raises(SIEError, match="closed") as closed:
                await asyncio.to_thread(sync_client.list_models)
            assert closed.value.code == "CLIENT_CLOSED"
            transport = sync_client._transport
        assert result["dense"].shape == (bge_m3.HIDDEN,), case.id
        if case.transport == "http":
            assert transport.client.is_closed, case.id


# ---- client-side MaxSim ------------------------------------------------------------------------------


async def test_client_maxsim_equals_the_servers_colbert_score(sdk: Sdk) -> None:
    documents = [Item(id=f"d{i}", text=t) for i, t in enumerate(DOCS)]
    query_result = await sdk(
        "encode",
        COLBERT,
        Item(text="What is ColBERT?"),
        output_types=["multivector"],
        is_query=True,
    )
    doc_results = await sdk("encode", COLBERT, documents, output_types=["multivector"])
    query_mv = query_result["multivector"]
    doc_mvs = [r["multivector"] for r in doc_results]
    assert query_mv.ndim == 2
    assert query_mv.shape[1] == colbert.DIM
    scores = maxsim(query_mv, doc_mvs)
    ranked = sorted(enumerate(scores), key=lambda x: -x[1])

    server_side = await sdk("score", COLBERT, Item(text="What is ColBERT?"), documents)
    by_id = {e["item_id"]: e["score"] for e in server_side["scores"]}
    assert [by_id[f"d{i}"] for i in range(len(DOCS))] == pytest.approx(scores, rel=1e-5)
    assert [f"d{i}" for i, _ in ranked] == [e["item_id"] for e in server_side["scores"]]
    # The encoded query multivector, sent back as the query, scores the same without re-encoding.
    given = await sdk("score", COLBERT, Item(multivector=query_mv), documents)
    by_id = {e["item_id"]: e["score"] for e in given["scores"]}
    assert [by_id[f"d{i}"] for i in range(len(DOCS))] == pytest.approx(scores, rel=1e-5)


# ---- request splitting ----------------------------------------------------------------------------------


def requests_ok(server: ServerHandle, model: str, endpoint: str) -> int:
    metrics = server.running.registry.metrics
    return metrics.counter("sie_requests_total", model=model, endpoint=endpoint, status="ok")


async def test_split_requests_keep_order_and_rank_globally(
    case: Case, server: ServerHandle, http: BridgeHandle
) -> None:
    texts = [f"item number {i} " + "word " * i for i in range(8)]
    items = [Item(id=f"i{i}", text=t) for i, t in enumerate(texts)]
    whole = make_sdk(case, url_of(case, server, http))
    split = make_sdk(case, url_of(case, server, http), max_items_per_request=3)
    try:
        want = await whole("encode", BGE_M3, items, output_types=["dense"])
        before = requests_ok(server, BGE_M3, "encode")
        got = await split("encode", BGE_M3, items, output_types=["dense"])
        assert requests_ok(server, BGE_M3, "encode") - before == 3, "8 items in 3 requests"
        assert [r["id"] for r in got] == [f"i{i}" for i in range(8)]
        for a, b in zip(got, want, strict=True):
            # Other batch neighbours may change the last bits of a forward pass.
            np.testing.assert_allclose(a["dense"], b["dense"], rtol=1e-5, atol=1e-6)
            assert a["num_tokens"] == b["num_tokens"]

        query = Item(id="q", text="item number 5")
        whole_scores = await whole("score", RERANKER, query, items)
        before = requests_ok(server, RERANKER, "score")
        split_scores = await split("score", RERANKER, query, items)
        assert requests_ok(server, RERANKER, "score") - before == 3
        entries = split_scores["scores"]
        assert [e["rank"] for e in entries] == list(range(8))
        values = [e["score"] for e in entries]
        assert values == sorted(values, reverse=True), "one ranking over every chunk"
        assert sorted(e["item_id"] for e in entries) == sorted(f"i{i}" for i in range(8))
        assert split_scores["query_id"] == "q"
        by_id = {e["item_id"]: e["score"] for e in whole_scores["scores"]}
        for scored in entries:
            assert scored["score"] == pytest.approx(by_id[scored["item_id"]], rel=1e-5, abs=1e-6)
    finally:
        await whole.close()
        await split.close()


async def test_split_requests_without_ids_number_items_as_one_call(
    case: Case, server: ServerHandle, http: BridgeHandle
) -> None:
    items = [Item(text=f"item number {i}") for i in range(7)]
    split = make_sdk(case, url_of(case, server, http), max_items_per_request=3)
    try:
        encoded = await split("encode", BGE_M3, items)
        scored = await split("score", RERANKER, Item(text="number"), items)
    finally:
        await split.close()
    assert [r["id"] for r in encoded] == [f"item-{i}" for i in range(7)]
    assert sorted(e["item_id"] for e in scored["scores"]) == sorted(f"item-{i}" for i in range(7))


async def test_an_encode_over_the_message_limit_is_split_where_the_server_says_items_fit(
    case: Case, catalog_dir: Path
) -> None:
    """The server refuses, before any compute, an encode whose response would pass its message
    limit, saying how many items fit (``items_that_fit``); the SDK sends them in requests of
    that many (again if one is still too large) and returns every result in order."""
    words = " ".join(f"token{i}" for i in range(60))
    items = [Item(text=f"{i} {words}") for i in range(24)]
    limit = 64 * 1024  # multivector rows of the tiny model are 128 bytes: ~500 tokens fit
    async with (
        serving([catalog_dir], [BGE_M3], max_message_bytes=limit) as small,
        bridged(small.address) as front,
    ):
        sdk = make_sdk(case, case.url(grpc_address=small.address, http_url=front.url))
        try:
            one = await sdk("encode", BGE_M3, items[5], output_types=["multivector"])
            before = requests_ok(small, BGE_M3, "encode")
            got = await sdk("encode", BGE_M3, items, output_types=["multivector"])
            sent = requests_ok(small, BGE_M3, "encode") - before
        finally:
            await sdk.close()
    assert [r["id"] for r in got] == [f"item-{i}" for i in range(24)]
    assert 3 <= sent < 24, f"split into a few requests ({sent})"
    assert got[5]["multivector"].shape == one["multivector"].shape
    np.testing.assert_allclose(got[5]["multivector"], one["multivector"], rtol=1e-4, atol=1e-5)


async def test_a_request_over_the_message_limit_is_sent_in_halves(
    case: Case, tmp_path: Path
) -> None:
    """A request over the server's ``--max-message-bytes`` (REQUEST_TOO_LARGE: grpc's own
    RESOURCE_EXHAUSTED, or the bridge's 413 for it) goes in halves until each passes."""
    write_catalog_entry(tmp_path / "catalog", fake_entry("fake/small-messages"))
    items = [Item(text=f"{i} " + "x" * 2500) for i in range(8)]  # 20 kB against 8 kB
    async with (
        serving([tmp_path / "catalog"], ["fake/small-messages"], max_message_bytes=8192) as small,
        bridged(small.address) as front,
    ):
        sdk = make_sdk(case, case.url(grpc_address=small.address, http_url=front.url))
        try:
            before = requests_ok(small, "fake/small-messages", "encode")
            got = await sdk("encode", "fake/small-messages", items)
            sent = requests_ok(small, "fake/small-messages", "encode") - before
        finally:
            await sdk.close()
    assert [r["id"] for r in got] == [f"item-{i}" for i in range(8)]
    assert all(r["dense"].shape == (2,) for r in got)
    assert sent == 4, "8 items of 2.5 kB: halves (10 kB) are still too large, quarters pass"


def test_smaller_bodies_split_only_a_refusal_for_size_that_splitting_helps() -> None:
    encode = Prepared(Operation(Kind.ENCODE, "m"), [], list, 1.0)
    score = Prepared(Operation(Kind.SCORE, "m"), [], list, 1.0)
    body = {"items": [{"text": str(i)} for i in range(7)], "params": {"output_types": ["dense"]}}

    def refusal(code: str = "INVALID_INPUT", **details: str) -> RequestError:
        error = RequestError("over the limit", code=code, status_code=400)
        error.details = details
        return error

    pieces = smaller_bodies(encode, body, refusal(items_that_fit="3"))
    assert pieces is not None
    assert [[item["id"] for item in piece["items"]] for piece in pieces] == [
        ["item-0", "item-1", "item-2"], ["item-3", "item-4", "item-5"], ["item-6"],
    ]  # fmt: skip
    assert all(piece["params"] == body["params"] for piece in pieces)
    assert smaller_bodies(encode, body, refusal()) is None, "no count: not that refusal"
    assert smaller_bodies(encode, body, refusal(items_that_fit="7")) is None, "would not help"
    assert smaller_bodies(encode, body, refusal(items_that_fit="x")) is None
    assert smaller_bodies(encode, body, refusal("QUEUE_FULL", items_that_fit="3")) is None
    assert smaller_bodies(score, body, refusal(items_that_fit="3")) is None
    halves = smaller_bodies(encode, body, refusal("REQUEST_TOO_LARGE"))
    assert halves is not None
    assert [len(piece["items"]) for piece in halves] == [4, 3]
    one = {"items": [{"text": "alone"}]}
    assert smaller_bodies(encode, one, refusal("REQUEST_TOO_LARGE")) is None, "nothing to split"
    assert smaller_bodies(score, body, refusal("REQUEST_TOO_LARGE")) is None, "ranked together"


# ---- images ---------------------------------------------------------------------------------------------


async def test_images_are_converted_and_refused_by_a_text_model(sdk: Sdk, tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :, 0] = 200
    pil_image = Image.fromarray(pixels)
    path = tmp_path / "photo.png"
    pil_image.save(path)
    jpeg = tmp_path / "photo.jpg"
    pil_image.save(jpeg)
    image_bytes = jpeg.read_bytes()
    inputs: list[list[Any]] = [
        [{"data": pil_image}],
        [{"data": str(path)}],
        [{"data": path}],
        [{"data": image_bytes, "format": "jpeg"}],
        [{"data": np.array(pil_image)}],
        [pil_image, str(path)],
    ]
    for images in inputs:
        with pytest.raises(RequestError) as caught:
            await sdk("encode", BGE_M3, Item(images=images))
        error = caught.value
        assert (error.code, error.status_code) == ("INVALID_INPUT", 400)
        assert f"model {BGE_M3} accepts text only" in str(error), "the server saw the images"
        assert error.model == BGE_M3


# ---- the reference's complete example ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    text: str


class VectorDb:
    """The example's vector database: dot-product search over stored vectors."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.vectors: dict[str, np.ndarray[Any, Any]] = {}

    def insert(self, id: str, vector: np.ndarray[Any, Any]) -> None:
        self.vectors[id] = vector

    def search(self, vector: np.ndarray[Any, Any], top_k: int) -> list[Candidate]:
        ranked = sorted(self.vectors, key=lambda i: -float(self.vectors[i] @ vector))
        return [Candidate(i, self.texts[i]) for i in ranked[:top_k]]


async def test_complete_example(case: Case, server: ServerHandle, http: BridgeHandle) -> None:
    documents = [*DOCS, "Machine learning learns from data.", "Python is a language."] * 3
    client = make_sdk(case, url_of(case, server, http), timeout_s=60.0)
    try:
        # Dense embeddings
        embeddings = await client(
            "encode", BGE_M3, [Item(id=f"doc-{i}", text=doc) for i, doc in enumerate(documents)]
        )
        # Store in vector database
        vector_db = VectorDb({f"doc-{i}": doc for i, doc in enumerate(documents)})
        for result in embeddings:
            vector_db.insert(result["id"], result["dense"])
        assert len(vector_db.vectors) == len(documents)

        # Query with reranking
        query = Item(text="What is machine learning?")
        query_emb = await client("encode", BGE_M3, query, is_query=True)
        candidates = vector_db.search(query_emb["dense"], top_k=100)
        assert len(candidates) == len(documents)
        rerank_result = await client(
            "score", RERANKER, query, [Item(id=c.id, text=c.text) for c in candidates]
        )
        top_10 = rerank_result["scores"][:10]
    finally:
        # Clean up
        await client.close()
    assert [scored["rank"] for scored in top_10] == list(range(10))
    assert {scored["item_id"] for scored in top_10} <= set(vector_db.vectors)
    values = [scored["score"] for scored in rerank_result["scores"]]
    assert values == sorted(values, reverse=True)
    # Identical texts score identically, whichever candidate ids they carry.
    by_text: dict[str, list[float]] = {}
    for scored in rerank_result["scores"]:
        by_text.setdefault(vector_db.texts[scored["item_id"]], []).append(scored["score"])
    assert len(by_text) == 5
    for scores in by_text.values():
        assert scores == pytest.approx([scores[0]] * 3, rel=1e-5, abs=1e-6)


# ---- the transport switch --------------------------------------------------------------------------------


async def test_the_url_chooses_the_transport(server: ServerHandle, http: BridgeHandle) -> None:
    port = server.address.rsplit(":", 1)[1]
    chosen = {
        http.url: (HttpTransport, AsyncHttpTransport),
        f"grpc://127.0.0.1:{port}": (GrpcTransport, AsyncGrpcTransport),
        f"127.0.0.1:{port}": (GrpcTransport, AsyncGrpcTransport),
    }
    for url, (sync_type, async_type) in chosen.items():
        sync_client = SIEClient(url)
        async_client = SIEAsyncClient(url)
        try:
            assert type(sync_client._transport) is sync_type, url
            assert type(async_client._transport) is async_type, url
            for client in (sync_client, async_client):
                result = await call(client, "encode", BGE_M3, Item(text="Hello"))
                assert result["dense"].shape == (bge_m3.HIDDEN,), url
        finally:
            await asyncio.to_thread(sync_client.close)
            await async_client.close()
    forced = SIEClient(f"127.0.0.1:{port}", transport="http")
    assert type(forced._transport) is HttpTransport
    forced.close()
    with pytest.raises(ValueError, match="transport must be"):
        SIEClient(http.url, transport="websocket")
