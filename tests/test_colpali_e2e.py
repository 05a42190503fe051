"""ColPali-family models served end to end: a real server (and a bridge in front of it) serving tiny
random ``ColPaliForRetrieval`` and ``ColQwen2ForRetrieval`` checkpoints (tests/tiny_models/colpali.py)
through the normal catalog and ``from_pretrained`` path.

* Page images (PNG bytes, decoded by the server) and query texts, in one request, give the
  multivectors transformers computes in-process for the same inputs (cosine >= 0.9999 per row,
  same shape), over gRPC, the bridge's msgpack and the SDK (both clients, both transports).
* A text query scored against page images equals ``processor.score_retrieval`` and ranks the
  same; ``sie_sdk.scoring.maxsim`` on the served multivectors equals the server's score, and so
  does sending the encoded query back as a multivector.
* Concurrent one-page requests share forward passes.
* An item with text and an image, or two images, is refused naming the item.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sie_sdk import Item
from sie_sdk.scoring import maxsim
from sie_sdk.tensors import from_tensor, to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, score_pb2, score_pb2_grpc

from tests.bridge_utils import BridgeHandle, bridged, pack, unpack
from tests.sdk.conftest import CASES, Case, make_sdk
from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.tiny_models import colpali
from tests.tiny_models.entries import entry

COLPALI = "tiny/colpali"
COLQWEN2 = "tiny/colqwen2"
MODELS = [COLPALI, COLQWEN2]
OUTPUTS = {"multivector": {"dims": colpali.DIM, "similarity": "maxsim"}}
QUERIES = ["revenue?", "which quarter had the highest revenue in the table on this page"]
PAGES = colpali.page_images(4)


def png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


PNGS = [png(page) for page in PAGES]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colpali-e2e")
    return {
        COLPALI: colpali.build_tiny_colpali(root / "colpali"),
        COLQWEN2: colpali.build_tiny_colqwen2(root / "colqwen2"),
    }


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    return {model: colpali.load_reference(folder) for model, folder in folders.items()}


@pytest.fixture(scope="module")
def expected(references: dict[str, tuple[Any, Any]]) -> dict[str, list[np.ndarray]]:
    """Per model: transformers' multivectors of every page, then every query."""
    return {
        model: colpali.reference_multivectors(reference, images=PAGES, texts=QUERIES)
        for model, reference in references.items()
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerHandle]:
    catalog = tmp_path_factory.mktemp("colpali-catalog")
    for model, folder in folders.items():
        write_catalog_entry(
            catalog, entry(model, "colpali", folder, OUTPUTS, inputs=["text", "image"])
        )
    async with serving([catalog], preload=MODELS) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


def page_item(data: bytes, item_id: str = "") -> common_pb2.Item:
    return common_pb2.Item(id=item_id, images=[common_pb2.ImageInput(data=data, format="png")])


def mixed_items() -> list[common_pb2.Item]:
    """Every page, then every query, in one request."""
    return [*(page_item(p) for p in PNGS), *(common_pb2.Item(text=q) for q in QUERIES)]


async def grpc_encode(
    server: ServerHandle, model: str, items: Sequence[common_pb2.Item]
) -> encode_pb2.EncodeResponse:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    return await stub.Encode(encode_pb2.EncodeRequest(model=model, items=list(items)))


def assert_same_rows(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    cosines = (got * want).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    )
    assert cosines.min() >= 0.9999


# ---- encode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
async def test_grpc_pages_and_queries_equal_transformers(
    server: ServerHandle, expected: dict[str, list[np.ndarray]], model: str
) -> None:
    response = await grpc_encode(server, model, mixed_items())
    assert len(response.items) == len(PAGES) + len(QUERIES)
    for result, want in zip(response.items, expected[model], strict=True):
        assert_same_rows(from_tensor(result.multivector.values), want)
        assert result.num_tokens == want.shape[0]
        assert not result.truncated


async def test_bridge_msgpack_pages_and_queries_equal_transformers(
    http: BridgeHandle, expected: dict[str, list[np.ndarray]]
) -> None:
    body = {
        "items": [
            *({"images": [{"data": p, "format": "png"}]} for p in PNGS),
            *({"text": q} for q in QUERIES),
        ]
    }
    headers = {"Content-Type": "application/msgpack"}
    async with http.session.post(f"/v1/encode/{COLPALI}", data=pack(body), headers=headers) as r:
        assert r.status == 200, await r.text()
        decoded = unpack(await r.read())
    for result, want in zip(decoded["items"], expected[COLPALI], strict=True):
        values = result["multivector"]["values"]
        assert isinstance(values, np.ndarray)
        assert_same_rows(values, want)
        assert result["num_tokens"] == want.shape[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_sdk_pages_and_queries_equal_transformers(
    case: Case,
    server: ServerHandle,
    http: BridgeHandle,
    expected: dict[str, list[np.ndarray]],
) -> None:
    sdk = make_sdk(case, case.url(grpc_address=server.address, http_url=http.url))
    try:
        # PNG bytes travel untouched (a PIL image would be re-encoded as JPEG by the SDK).
        items = [*(Item(images=[p]) for p in PNGS), *(Item(text=q) for q in QUERIES)]
        results = await sdk("encode", COLQWEN2, items)
    finally:
        await sdk.close()
    for result, want in zip(results, expected[COLQWEN2], strict=True):
        assert_same_rows(result["multivector"], want)
        assert result["num_tokens"] == want.shape[0]


# ---- score -------------------------------------------------------------------------------------


def score_request(model: str, query: common_pb2.Item) -> score_pb2.ScoreRequest:
    return score_pb2.ScoreRequest(
        model=model, query=query, items=[page_item(p, f"page-{i}") for i, p in enumerate(PNGS)]
    )


def by_page(response: score_pb2.ScoreResponse) -> list[float]:
    scores = {e.item_id: e.score for e in response.scores}
    return [scores[f"page-{i}"] for i in range(len(PNGS))]


@pytest.mark.parametrize("model", MODELS)
async def test_scores_are_score_retrieval_and_client_maxsim(
    server: ServerHandle,
    references: dict[str, tuple[Any, Any]],
    expected: dict[str, list[np.ndarray]],
    model: str,
) -> None:
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    query = QUERIES[1]
    response = await stub.Score(score_request(model, common_pb2.Item(text=query)))
    pages, query_rows = expected[model][: len(PAGES)], expected[model][-1]
    want = colpali.reference_scores(references[model], query_rows, pages)
    assert np.ptp(want) > 0.1, "the pages must score apart for the ranking to mean something"
    got = by_page(response)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ranked = [f"page-{i}" for i in np.argsort(-np.asarray(want), kind="stable")]
    assert [e.item_id for e in response.scores] == ranked

    # Client-side MaxSim on what the server encoded gives the server's scores.
    encoded = await grpc_encode(server, model, [common_pb2.Item(text=query), *mixed_items()[:4]])
    vectors = [from_tensor(r.multivector.values) for r in encoded.items]
    np.testing.assert_allclose(maxsim(vectors[0], vectors[1:]), got, rtol=1e-5, atol=1e-5)

    # The encoded query sent back as a multivector scores the same, without encoding it again.
    given = common_pb2.Item(multivector=to_tensor(vectors[0], common_pb2.DTYPE_FLOAT32))
    again = await stub.Score(score_request(model, given))
    np.testing.assert_allclose(by_page(again), got, rtol=1e-5, atol=1e-5)


# ---- batching ----------------------------------------------------------------------------------


async def test_concurrent_page_requests_share_forward_passes(server: ServerHandle) -> None:
    metrics = server.running.registry.metrics
    before = metrics.counter("sie_batches_total", model=COLPALI, status="ok")
    calls = [grpc_encode(server, COLPALI, [page_item(PNGS[i % len(PNGS)])]) for i in range(16)]
    responses = await asyncio.gather(*calls)
    passes = metrics.counter("sie_batches_total", model=COLPALI, status="ok") - before
    assert all(len(r.items) == 1 for r in responses)
    assert passes < len(calls), f"{passes} forward passes for {len(calls)} requests"


# ---- refused items -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            common_pb2.Item(text="q", images=[common_pb2.ImageInput(data=PNGS[0])]),
            "item 1 has both text and an image",
        ),
        (
            common_pb2.Item(images=[common_pb2.ImageInput(data=p) for p in PNGS[:2]]),
            "item 1 has 2 images",
        ),
    ],
)
async def test_an_item_that_is_not_one_text_or_one_image_is_refused(
    server: ServerHandle, item: common_pb2.Item, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_encode(server, COLPALI, [common_pb2.Item(text="fine"), item])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert error_info(caught.value)[0] == "INVALID_INPUT"
