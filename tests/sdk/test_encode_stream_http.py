"""The HTTP transport's ``encode_stream`` against a scripted bridge (``httpx.MockTransport``):
what a real bridge rarely does. A POST that ends early (an error line, or no reason given) is
resumed with exactly its unanswered batches; a retried reason on a POST's last line resumes and
another reason is that batch's error; an error response before the stream is raised; and JSON
lines parse into the arrays the msgpack path gives, for every vector kind and dtype. The same
transport against a real bridge: tests/sdk/test_encode_stream.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from sie_sdk import SIEAsyncClient, SIEClient
from sie_sdk.client._transports.http import AsyncHttpTransport, HttpTransport, _stream_result
from sie_sdk.client.errors import RequestError
from sie_sdk.convert import from_proto
from sie_sdk.tensors import DTYPE_NAMES, DTYPE_TO_NUMPY, DType
from sie_sdk.types import Item
from sie_sdk.v1 import common_pb2, encode_pb2
from sie_sdk.wire import dump_json, unpacked

MODEL = "fake/sdk-stream"
FLAVORS = ("sync", "async")


class ScriptedBridge:
    """Answers stream POSTs from ``script``: per POST, how many of its lines to answer before the
    response ends (None: all), and the error line (a detail) to end it with, if any. A result is
    ``dense = [sequence of the batch's first item, 0]``: which batch was answered shows."""

    def __init__(self, script: list[tuple[int | None, dict[str, str] | None]]) -> None:
        self.script = script
        self.posts: list[list[str]] = []  # the first item id of each line, per POST

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v1/encode/{MODEL}/stream"
        assert request.headers["Content-Type"] == "application/x-ndjson"
        bodies = [json.loads(line) for line in request.content.splitlines()]
        self.posts.append([body["items"][0]["id"] for body in bodies])
        answered, error = self.script[len(self.posts) - 1]
        lines = []
        for sequence, body in enumerate(bodies[:answered], start=1):
            items = [
                {"id": item["id"], "dense": {"dims": 2, "dtype": "float32", "values": [n, 0]}}
                for n, item in enumerate(body["items"], start=int(item_number(body)))
            ]
            result = {"model": MODEL, "items": items, "timing": {}}
            lines.append({"sequence": sequence, "result": result})
        if error is not None:
            lines.append({"sequence": len(lines) + 1, "error": error})
        content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return httpx.Response(
            200, content=content, headers={"Content-Type": "application/x-ndjson"}
        )


def item_number(body: dict[str, Any]) -> int:
    return int(str(body["items"][0]["id"]).removeprefix("item-"))


async def scripted_stream(flavor: str, bridge: ScriptedBridge, count: int) -> list[Any]:
    """``encode_stream`` of ``count`` items (batches of 10, window 2) against ``bridge``."""
    items: list[Item] = [{"text": f"t{i}"} for i in range(count)]
    mock = httpx.MockTransport(bridge)
    if flavor == "async":
        async with SIEAsyncClient("http://bridge") as client:
            transport = client._transport
            assert isinstance(transport, AsyncHttpTransport)
            await transport.client.aclose()
            transport.client = httpx.AsyncClient(transport=mock, base_url="http://bridge")
            return [r async for r in client.encode_stream(MODEL, items, batch_size=10, window=2)]

    def run() -> list[Any]:
        with SIEClient("http://bridge") as client:
            transport = client._transport
            assert isinstance(transport, HttpTransport)
            transport.client.close()
            transport.client = httpx.Client(transport=mock, base_url="http://bridge")
            return list(client.encode_stream(MODEL, items, batch_size=10, window=2))

    return await asyncio.to_thread(run)


def assert_scripted(results: list[Any], count: int) -> None:
    assert [r["id"] for r in results] == [f"item-{i}" for i in range(count)]
    assert [int(r["dense"][0]) for r in results] == list(range(count))


UNAVAILABLE = {"code": "BACKEND_UNAVAILABLE", "message": "the server went away"}


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_post_that_ends_early_is_resumed_with_its_unanswered_batches(
    flavor: str,
) -> None:
    bridge = ScriptedBridge(
        [
            (1, UNAVAILABLE),  # batch 2 (of 1-4) failed: the stream ended there
            (2, None),  # batches 2-5: the response ends after 3 and 4, no reason given
            (None, None),
            (None, None),
        ]
    )
    results = await scripted_stream(flavor, bridge, 80)
    assert_scripted(results, 80)
    assert bridge.posts == [
        ["item-0", "item-10", "item-20", "item-30"],
        ["item-10", "item-20", "item-30", "item-40"],
        ["item-30", "item-40", "item-50", "item-60"],
        ["item-70"],
    ]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_retried_reason_on_a_posts_last_line_resumes_and_another_is_that_batch_s(
    flavor: str,
) -> None:
    invalid = {"code": "INVALID_INPUT", "message": "bad batch", "model": MODEL}
    # Batches 1-4 (BACKEND_UNAVAILABLE on 4, the last line), 4-7, 8-11 (INVALID_INPUT on 11).
    bridge = ScriptedBridge([(3, UNAVAILABLE), (None, None), (3, invalid)])
    results = await scripted_stream(flavor, bridge, 110)
    assert [post[0] for post in bridge.posts] == ["item-0", "item-30", "item-70"]
    errors = results[100:]
    assert len(errors) == 10
    assert all(isinstance(e, RequestError) and e.code == "INVALID_INPUT" for e in errors)
    assert errors[0].model == MODEL
    assert_scripted(results[:100], 100)


async def test_an_error_response_before_the_stream_is_raised() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        detail = {"code": "MODEL_NOT_FOUND", "message": "no such model", "model": MODEL}
        return httpx.Response(404, json={"detail": detail})

    async with SIEAsyncClient("http://bridge") as client:
        transport = client._transport
        assert isinstance(transport, AsyncHttpTransport)
        await transport.client.aclose()
        mock = httpx.MockTransport(refuse)
        transport.client = httpx.AsyncClient(transport=mock, base_url="http://bridge")
        with pytest.raises(RequestError) as refused:
            [r async for r in client.encode_stream(MODEL, [{"text": "x"}])]
    assert refused.value.code == "MODEL_NOT_FOUND"
    assert refused.value.status_code == 404


def test_json_lines_give_the_arrays_the_msgpack_path_gives() -> None:
    """Every vector kind and dtype: the NDJSON line, parsed, equals the unary response."""

    def tensor(array: npt.NDArray[Any], dtype: DType) -> common_pb2.Tensor:
        return common_pb2.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())

    rng = np.random.default_rng(7)
    results = []
    for dtype, name in DTYPE_NAMES.items():
        values = (rng.integers(0, 400, size=(3, 16)) / 4).astype(DTYPE_TO_NUMPY[dtype])
        results.append(
            encode_pb2.EncodeResult(
                id=name,
                dense=encode_pb2.DenseVector(dims=16, values=tensor(values[0], dtype)),
                multivector=encode_pb2.MultiVector(
                    token_dims=16, num_tokens=3, values=tensor(values, dtype)
                ),
                sparse=encode_pb2.SparseVector(
                    dims=30000,
                    indices=tensor(np.array([3, 70, 29999], np.int32), common_pb2.DTYPE_INT32),
                    values=tensor(values[0, :3], dtype),
                ),
                num_tokens=3,
            )
        )
    reply = encode_pb2.EncodeResponse(model=MODEL, items=results)
    expected = unpacked(from_proto.encode_response(reply))
    parsed = _stream_result(json.loads(dump_json(from_proto.encode_response(reply))))
    assert len(parsed["items"]) == len(expected["items"]) == len(DTYPE_NAMES)
    for got, want in zip(parsed["items"], expected["items"], strict=True):
        for key, path in (
            ("dense", "values"),
            ("multivector", "values"),
            ("sparse", "indices"),
            ("sparse", "values"),
        ):
            assert got[key][path].dtype == want[key][path].dtype, (got["id"], key, path)
            assert got[key][path].shape == want[key][path].shape
            np.testing.assert_array_equal(got[key][path], want[key][path])
        rest = ("dense", "multivector", "sparse")
        assert {k: v for k, v in got.items() if k not in rest} == {
            k: v for k, v in want.items() if k not in rest
        }
