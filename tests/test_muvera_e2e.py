"""MUVERA end to end on the tiny ColBERT: the FDE the server returns, over gRPC and through the
bridge (msgpack and JSON), equals fastembed's (``tests/test_muvera.py: reference_fde``) applied
to the multivector the same server returns for the same item, through the profile and the
explicit option; a model without multivectors refuses ``muvera``; and ranking a corpus by FDE
dot product follows ranking by the server's MaxSim (mean Spearman >= 0.8)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from scipy.stats import spearmanr  # type: ignore[import-untyped]
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)
from sie_server.tasks.muvera import MuveraParams, parse_muvera

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged, pack, unpack
from tests.server_utils import ServerHandle, error_info, serving, write_catalog_entry
from tests.test_muvera import reference_fde
from tests.texts import corpus
from tests.tiny_models import colbert, dense
from tests.tiny_models.entries import DENSE_OUTPUTS, entry

COLBERT = "tiny/colbert"
DENSE = "tiny/dense"
TEXTS = [
    "Hello, world!",
    "Late interaction keeps one vector per token and scores with MaxSim.",
    "x",
]
#: An explicit configuration: inner projection, final count sketch, a seed of its own.
OPTION = {"k_sim": 3, "dim_proj": 8, "r_reps": 6, "final_dim": 200, "seed": 5}
PARAMS = parse_muvera(OPTION, colbert.DIM, COLBERT)
#: The profile's configuration (the original SIE's defaults: 40 x 64 x 16 -> 10240).
PROFILE = parse_muvera({}, colbert.DIM, COLBERT)


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("muvera")
    entries = [
        entry(
            COLBERT,
            "colbert",
            colbert.build_tiny_colbert(root / "colbert"),
            {"multivector": {"dims": colbert.DIM, "similarity": "maxsim"}},
            load_options={"doc_maxlen": 48, "query_maxlen": 16},
            profiles={
                "default": {"output_types": ["multivector"]},
                "muvera": {"output_types": ["multivector"], "options": {"muvera": {}}},
            },
        ),
        entry(DENSE, "dense", dense.build_tiny_dense(root / "dense"), DENSE_OUTPUTS),
    ]
    for item in entries:
        write_catalog_entry(root / "catalog", item)
    return root / "catalog"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=[COLBERT, DENSE]) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


async def grpc_encode(
    server: ServerHandle,
    model: str,
    texts: Sequence[str],
    options: dict[str, Any] | None = None,
    **params: Any,
) -> encode_pb2.EncodeResponse:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    request = encode_pb2.EncodeRequest(
        model=model,
        items=[common_pb2.Item(text=t) for t in texts],
        params=encode_pb2.EncodeParams(**params),
    )
    if options:
        request.params.options.update(options)
    return await stub.Encode(request)


async def multivectors(
    server: ServerHandle, texts: Sequence[str], *, is_query: bool
) -> list[npt.NDArray[Any]]:
    """The server's own multivectors (no MUVERA) for ``texts``."""
    response = await grpc_encode(
        server, COLBERT, texts, output_types=["multivector"], is_query=is_query
    )
    return [from_tensor(item.multivector.values) for item in response.items]


def assert_fdes(
    got: Sequence[npt.NDArray[Any]],
    vectors: Sequence[npt.NDArray[Any]],
    params: MuveraParams,
    *,
    is_query: bool,
) -> None:
    assert len(got) == len(vectors)
    for fde, vector in zip(got, vectors, strict=True):
        want = reference_fde(vector, params, is_query=is_query)
        assert fde.dtype == np.float32
        assert fde.shape == (params.dims,)
        gap = float(np.max(np.abs(fde - want)))
        assert np.allclose(fde, want, rtol=1e-6, atol=1e-6), f"max difference {gap}"


# ---- gRPC --------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_query", [False, True], ids=["document", "query"])
async def test_grpc_fde_equals_the_reference_on_the_multivector_it_returns(
    server: ServerHandle, is_query: bool
) -> None:
    response = await grpc_encode(
        server,
        COLBERT,
        TEXTS,
        {"muvera": OPTION},
        output_types=["dense", "multivector"],
        is_query=is_query,
    )
    for item in response.items:
        assert item.dense.dims == PARAMS.dims
        assert item.multivector.num_tokens > 0
    assert_fdes(
        [from_tensor(item.dense.values) for item in response.items],
        [from_tensor(item.multivector.values) for item in response.items],
        PARAMS,
        is_query=is_query,
    )
    # The multivector returned alongside is the model's own, as without MUVERA.
    plain = await multivectors(server, TEXTS, is_query=is_query)
    for item, vector in zip(response.items, plain, strict=True):
        assert from_tensor(item.multivector.values).tobytes() == vector.tobytes()


@pytest.mark.parametrize("is_query", [False, True], ids=["document", "query"])
async def test_grpc_profile_and_explicit_option_give_the_same_fde(
    server: ServerHandle, is_query: bool
) -> None:
    by_name = await grpc_encode(server, f"{COLBERT}:muvera", TEXTS, is_query=is_query)
    by_option = await grpc_encode(server, COLBERT, TEXTS, {"profile": "muvera"}, is_query=is_query)
    explicit = await grpc_encode(
        server, COLBERT, TEXTS, {"muvera": {"seed": 42}}, output_types=["dense"], is_query=is_query
    )
    for response in (by_name, by_option, explicit):
        for item in response.items:
            assert not item.HasField("multivector")
            assert item.dense.dims == PROFILE.dims == 10240
    fdes = [from_tensor(item.dense.values) for item in by_name.items]
    for response in (by_option, explicit):
        assert [from_tensor(i.dense.values).tobytes() for i in response.items] == [
            f.tobytes() for f in fdes
        ]
    assert_fdes(
        fdes, await multivectors(server, TEXTS, is_query=is_query), PROFILE, is_query=is_query
    )


async def test_output_dtype_applies_to_the_fde(server: ServerHandle) -> None:
    response = await grpc_encode(server, COLBERT, TEXTS, {"muvera": OPTION}, output_dtype="binary")
    vectors = await multivectors(server, TEXTS, is_query=False)
    for item, vector in zip(response.items, vectors, strict=True):
        assert item.dense.dims == PARAMS.dims
        want = np.packbits(reference_fde(vector, PARAMS, is_query=False) > 0)
        np.testing.assert_array_equal(from_tensor(item.dense.values), want)


async def test_get_model_reports_what_the_muvera_profile_returns(server: ServerHandle) -> None:
    """The profile's responses hold the dense FDE (dot product), not the multivector it is
    computed from; the default profile still reports the multivector and MaxSim."""
    stub = models_pb2_grpc.ModelServiceStub(server.channel)
    for name in (COLBERT, f"{COLBERT}:muvera"):
        info = (await stub.GetModel(models_pb2.GetModelRequest(name=name))).model
        muvera, default = info.profiles["muvera"], info.profiles["default"]
        assert (list(muvera.output_types), dict(muvera.output_similarity)) == (
            ["dense"],
            {"dense": "dot"},
        )
        assert (list(default.output_types), dict(default.output_similarity)) == (
            ["multivector"],
            {"multivector": "maxsim"},
        )
        assert muvera.is_default == name.endswith(":muvera")
    response = await grpc_encode(server, f"{COLBERT}:muvera", TEXTS[:1])
    assert [response.items[0].HasField(t) for t in ("dense", "multivector")] == [True, False]


async def test_the_bridge_reports_the_muvera_profile_as_get_model_does(http: BridgeHandle) -> None:
    async with http.session.get(f"/v1/models/{COLBERT}", headers=JSON_HEADERS) as reply:
        assert reply.status == 200, await reply.text()
        profiles = (await reply.json())["profiles"]
    assert profiles["muvera"]["output_types"] == ["dense"]
    assert profiles["muvera"]["output_similarity"] == {"dense": "dot"}
    assert profiles["default"]["output_similarity"] == {"multivector": "maxsim"}


async def test_grpc_refuses_muvera_on_a_model_without_multivectors(server: ServerHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_encode(server, DENSE, TEXTS, {"muvera": {}})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "option 'muvera' encodes multivectors; model tiny/dense has none" in (
        caught.value.details() or ""
    )
    assert error_info(caught.value)[0] == "INVALID_INPUT"
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await grpc_encode(server, COLBERT, TEXTS, {"muvera": {"k_sim": 99}})
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'muvera.k_sim' must be between 1 and 8, got 99" in (bad.value.details() or "")


# ---- the bridge --------------------------------------------------------------------------------
async def post(http: BridgeHandle, path: str, body: Any, *, as_json: bool) -> tuple[int, Any]:
    if as_json:
        async with http.session.post(path, json=body, headers=JSON_HEADERS) as response:
            return response.status, await response.json()
    headers = {"Content-Type": "application/msgpack"}
    async with http.session.post(path, data=pack(body), headers=headers) as response:
        return response.status, unpack(await response.read())


@pytest.mark.parametrize("as_json", [False, True], ids=["msgpack", "json"])
@pytest.mark.parametrize("is_query", [False, True], ids=["document", "query"])
async def test_bridge_fde_equals_the_reference(
    http: BridgeHandle, server: ServerHandle, as_json: bool, is_query: bool
) -> None:
    vectors = await multivectors(server, TEXTS, is_query=is_query)
    items = [{"text": t} for t in TEXTS]
    explicit = {
        "items": items,
        "params": {"output_types": ["dense"], "is_query": is_query, "options": {"muvera": OPTION}},
    }
    status, body = await post(http, f"/v1/encode/{COLBERT}", explicit, as_json=as_json)
    assert status == 200, body
    assert all(item["dense"]["dims"] == PARAMS.dims for item in body["items"])
    got = [np.asarray(item["dense"]["values"], dtype=np.float32) for item in body["items"]]
    assert_fdes(got, vectors, PARAMS, is_query=is_query)
    profile = {"items": items, "params": {"options": {"is_query": is_query}}}
    status, body = await post(http, f"/v1/encode/{COLBERT}:muvera", profile, as_json=as_json)
    assert status == 200, body
    assert all("multivector" not in item for item in body["items"])
    got = [np.asarray(item["dense"]["values"], dtype=np.float32) for item in body["items"]]
    assert_fdes(got, vectors, PROFILE, is_query=is_query)


async def test_bridge_refuses_muvera_on_a_model_without_multivectors(http: BridgeHandle) -> None:
    body = {"items": [{"text": "a"}], "params": {"options": {"muvera": {}}}}
    status, answer = await post(http, f"/v1/encode/{DENSE}", body, as_json=True)
    assert status == 400
    assert answer["detail"]["code"] == "INVALID_INPUT"
    assert "option 'muvera' encodes multivectors" in answer["detail"]["message"]


# ---- FDE dot product against MaxSim ------------------------------------------------------------
def graded_corpus(base: Sequence[str], words: Sequence[str], rng: np.random.Generator) -> list[str]:
    """24 documents: ``base`` with 0 to len(base) of its words replaced by random ones."""
    docs = []
    for n in range(24):
        doc = list(base)
        for position in rng.choice(len(base), size=n % (len(base) + 1), replace=False):
            doc[position] = str(rng.choice(words))
        docs.append(" ".join(doc))
    return docs


async def maxsim(server: ServerHandle, query: str, docs: Sequence[str]) -> list[float]:
    """The server's score (ColBERT MaxSim) of each doc, in request order."""
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    response = await stub.Score(
        score_pb2.ScoreRequest(
            model=COLBERT,
            query=common_pb2.Item(text=query),
            items=[common_pb2.Item(id=str(i), text=d) for i, d in enumerate(docs)],
        )
    )
    scores = {entry.item_id: entry.score for entry in response.scores}
    return [scores[str(i)] for i in range(len(docs))]


async def test_fde_dot_products_rank_a_corpus_like_maxsim(server: ServerHandle) -> None:
    """Six queries (eight words of a corpus text each), each ranking its own 24 documents: the
    query's words with 0 to 8 of them replaced, by the profile's FDE dot product and by the
    server's MaxSim. Unrelated texts would not do: with random weights every token vector is
    about as close to every other, so MaxSim over unrelated texts is a near-tie (12.8 to 13.6
    over 24 such documents) that only noise orders, for any approximation."""
    texts = corpus()["short"]
    words = sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})
    rng = np.random.default_rng(0)
    correlations = []
    for text in texts[200:206]:
        base = re.findall(r"[a-z]+", text.lower())[:8]
        query, docs = " ".join(base), graded_corpus(base, words, rng)
        doc_fdes = await grpc_encode(server, f"{COLBERT}:muvera", docs)
        (query_fde,) = (
            await grpc_encode(server, f"{COLBERT}:muvera", [query], is_query=True)
        ).items
        matrix = np.stack([from_tensor(item.dense.values) for item in doc_fdes.items])
        by_fde = matrix @ from_tensor(query_fde.dense.values)
        correlations.append(float(spearmanr(by_fde, await maxsim(server, query, docs)).statistic))
    mean = float(np.mean(correlations))
    assert mean >= 0.8, f"mean Spearman {mean:.3f} (per query: {np.round(correlations, 3)})"
