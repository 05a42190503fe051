"""``POST /v1/embeddings`` with the ``openai`` package itself, pointed at the bridge: floats and
its default base64 equal the gRPC Encode result, token-id input, ``dimensions`` (truncate and
renormalise where the catalog allows, else a 400 the package raises as BadRequestError), usage
with real token counts, and errors in both the spec's and OpenAI's shapes."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import pytest_asyncio
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged
from tests.server_utils import ServerHandle, serving, write_catalog_entry
from tests.tiny_models import dense
from tests.tiny_models.bert import minilm_tokenizer

TEXTS = ["Hello, world!", "Embeddings through the OpenAI API.", "x"]
CUT = 8


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openai")
    weights = str(dense.build_tiny_dense(root / "dense"))
    for name, truncatable in (("tiny/dense", False), ("tiny/matryoshka", True)):
        write_catalog_entry(
            root / "catalog",
            {
                "name": name,
                "adapter": "dense",
                "weights_path": weights,
                "max_sequence_length": 128,
                "outputs": {"dense": {"dims": dense.HIDDEN, "truncatable": truncatable}},
            },
        )
    return root / "catalog"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=["tiny/dense", "tiny/matryoshka"]) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


@pytest_asyncio.fixture(loop_scope="session")
async def client(http: BridgeHandle) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


async def grpc_vectors(
    server: ServerHandle, model: str, items: list[common_pb2.Item], **params: Any
) -> encode_pb2.EncodeResponse:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    return await stub.Encode(
        encode_pb2.EncodeRequest(model=model, items=items, params=encode_pb2.EncodeParams(**params))
    )


def as_array(embedding: list[float] | str) -> np.ndarray:
    """The package decodes base64 itself when the caller left encoding_format unset; asked for
    explicitly, it hands back the string (little-endian float32)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def text_items() -> list[common_pb2.Item]:
    return [common_pb2.Item(text=t) for t in TEXTS]


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
async def test_embeddings_equal_grpc_encode(
    client: openai.AsyncOpenAI, server: ServerHandle, encoding_format: str | None
) -> None:
    kwargs: dict[str, Any] = {} if encoding_format is None else {"encoding_format": encoding_format}
    result = await client.embeddings.create(model="tiny/dense", input=TEXTS, **kwargs)
    want = await grpc_vectors(server, "tiny/dense", text_items())
    assert result.model == "tiny/dense"
    assert [d.index for d in result.data] == [0, 1, 2]
    for data, ref in zip(result.data, want.items, strict=True):
        got = as_array(data.embedding)
        assert got.tobytes() == from_tensor(ref.dense.values).tobytes()
    tokens = sum(item.num_tokens for item in want.items)
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens


async def test_a_single_string_and_token_id_inputs(
    client: openai.AsyncOpenAI, server: ServerHandle
) -> None:
    single = await client.embeddings.create(model="tiny/dense", input=TEXTS[1])
    tokenizer = minilm_tokenizer()
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:2]]
    as_ids = await client.embeddings.create(model="tiny/dense", input=ids)
    one_list = await client.embeddings.create(model="tiny/dense", input=ids[1])
    want = await grpc_vectors(server, "tiny/dense", text_items())
    assert single.data[0].embedding == one_list.data[0].embedding
    for data, ref in zip(as_ids.data, want.items[:2], strict=True):
        assert np.asarray(data.embedding, dtype=np.float32).tobytes() == (
            from_tensor(ref.dense.values).tobytes()
        )
    assert as_ids.usage.prompt_tokens == sum(i.num_tokens for i in want.items[:2])


async def test_dimensions_truncate_and_renormalise_where_allowed(
    client: openai.AsyncOpenAI, server: ServerHandle
) -> None:
    result = await client.embeddings.create(model="tiny/matryoshka", input=TEXTS, dimensions=CUT)
    full = await grpc_vectors(server, "tiny/matryoshka", text_items())
    for data, ref in zip(result.data, full.items, strict=True):
        got = np.asarray(data.embedding, dtype=np.float32)
        head = from_tensor(ref.dense.values)[:CUT].astype(np.float64)
        assert got.shape == (CUT,)
        np.testing.assert_allclose(got, head / np.linalg.norm(head), rtol=1e-5, atol=1e-6)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model="tiny/dense", input=TEXTS, dimensions=CUT)
    assert refused.value.status_code == 400
    assert "truncatable" in str(refused.value)


async def test_errors_carry_both_shapes(http: BridgeHandle, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="no/such-model", input="hi")
    cases = [
        ({"model": "tiny/dense", "input": []}, "input must be"),
        ({"model": "tiny/dense", "input": ["a", 1]}, "mixes"),
        ({"model": "tiny/dense", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a"}, "model is required"),
        ({"model": "tiny/dense", "input": "a", "colour": 1}, "unknown field colour"),
        ({"model": "tiny/dense", "input": [[1, 2], [10**6]]}, "outside"),
    ]
    for body, fragment in cases:
        async with http.session.post("/v1/embeddings", json=body, headers=JSON_HEADERS) as r:
            assert r.status == 400, body
            payload = await r.json()
        assert payload["detail"]["code"] == "INVALID_INPUT"
        assert fragment in payload["detail"]["message"], payload
        assert payload["error"]["type"] == "invalid_request_error"
        assert payload["error"]["message"] == payload["detail"]["message"]


async def test_concurrent_openai_calls(client: openai.AsyncOpenAI) -> None:
    results = await asyncio.gather(
        *(client.embeddings.create(model="tiny/dense", input=[t]) for t in TEXTS * 4)
    )
    # Calls batch together with others of other lengths: equal up to float rounding.
    firsts = {TEXTS[i % 3]: r.data[0].embedding for i, r in enumerate(results)}
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.data[0].embedding, firsts[TEXTS[i % 3]], atol=1e-6)
    assert len({len(r.data[0].embedding) for r in results}) == 1
