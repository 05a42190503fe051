"""What every SDK call carries, seen from the server's side of each transport: the API key
(``Authorization: Bearer`` on HTTP, ``authorization`` metadata on gRPC), the client's default
options merged under the call's, and ``timeout_s`` as the call's deadline (both transports end
in the same ``ServerError`` with code DEADLINE_EXCEEDED), and a multi-address gRPC target spread
over every server with grpc's round_robin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from google.protobuf import json_format
from sie_sdk import SIEAsyncClient, SIEClient
from sie_sdk.client.errors import ServerError
from sie_sdk.convert import to_proto
from sie_sdk.v1 import encode_pb2, encode_pb2_grpc
from sie_sdk.wire import MSGPACK, pack_msgpack, unpack_msgpack

from tests.fakes import FakeAdapter
from tests.server_utils import fake_entry, serving, write_catalog_entry


@dataclass
class Seen:
    auth: list[str | None] = field(default_factory=list)
    options: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0


class RecordingEncode(encode_pb2_grpc.EncodeServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def Encode(
        self, request: encode_pb2.EncodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> encode_pb2.EncodeResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.seen.auth.append(metadata.get("authorization"))
        self.seen.options.append(json_format.MessageToDict(request.params.options))
        await asyncio.sleep(self.seen.delay_s)
        return encode_pb2.EncodeResponse(
            model=request.model,
            items=[encode_pb2.EncodeResult(id=f"item-{i}") for i in range(len(request.items))],
        )


@dataclass
class Endpoints:
    grpc_url: str
    http_url: str
    seen: Seen


@pytest_asyncio.fixture(loop_scope="session")
async def endpoints() -> AsyncIterator[Endpoints]:
    seen = Seen()
    server = grpc.aio.server()
    encode_pb2_grpc.add_EncodeServiceServicer_to_server(RecordingEncode(seen), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def encode(request: web.Request) -> web.Response:
        body = unpack_msgpack(await request.read())
        seen.auth.append(request.headers.get("Authorization"))
        message = to_proto.encode_request(request.match_info["model"], body)
        seen.options.append(json_format.MessageToDict(message.params.options))
        await asyncio.sleep(seen.delay_s)
        items = [{"id": f"item-{i}"} for i in range(len(body["items"]))]
        return web.Response(body=pack_msgpack({"items": items}), content_type=MSGPACK)

    app = web.Application()
    app.router.add_post("/v1/encode/{model:.+}", encode)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]
    try:
        yield Endpoints(f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", seen)
    finally:
        await runner.cleanup()
        await server.stop(None)


async def encode_with(url: str, kind: str, **client_kwargs: Any) -> Any:
    call_options = {"call": "yes", "shared": "call"}
    if kind == "async":
        async with SIEAsyncClient(url, **client_kwargs) as client:
            return await client.encode("m", {"text": "x"}, options=call_options)

    def run() -> Any:
        with SIEClient(url, **client_kwargs) as client:
            return client.encode("m", {"text": "x"}, options=call_options)

    return await asyncio.to_thread(run)


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_api_key_and_merged_options_reach_the_server(
    endpoints: Endpoints, transport: str, kind: str
) -> None:
    url = endpoints.grpc_url if transport == "grpc" else endpoints.http_url
    endpoints.seen.auth.clear()
    endpoints.seen.options.clear()
    result = await encode_with(
        url, kind, api_key="s3cret", options={"default": "yes", "shared": "client"}
    )
    assert result["id"] == "item-0"
    assert endpoints.seen.auth == ["Bearer s3cret"]
    assert endpoints.seen.options == [{"default": "yes", "call": "yes", "shared": "call"}]
    await encode_with(url, kind)
    assert endpoints.seen.auth[-1] is None


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_timeout_is_the_calls_deadline(
    endpoints: Endpoints, transport: str, kind: str
) -> None:
    url = endpoints.grpc_url if transport == "grpc" else endpoints.http_url
    endpoints.seen.delay_s = 2.0
    try:
        with pytest.raises(ServerError) as raised:
            await encode_with(url, kind, timeout_s=0.2)
    finally:
        endpoints.seen.delay_s = 0.0
    assert raised.value.code == "DEADLINE_EXCEEDED"
    assert raised.value.status_code == 504


async def test_a_multi_address_grpc_target_spreads_calls_round_robin(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry("fake/rr"))
    catalog = [tmp_path / "catalog"]
    async with serving(catalog, ["fake/rr"]) as one, serving(catalog, ["fake/rr"]) as two:
        async with SIEAsyncClient(f"{one.address},{two.address}") as client:
            for n in range(8):
                await client.encode("fake/rr", {"text": f"call{n}"})
        seen = []
        for handle in (one, two):
            adapter = handle.running.registry.entry("fake/rr").adapter
            assert isinstance(adapter, FakeAdapter)
            seen.append({t for t in adapter.seen_texts() if t.startswith("call")})
    assert seen[0], "the first server took calls"
    assert seen[1], "the second server took calls"
    assert seen[0] | seen[1] == {f"call{n}" for n in range(8)}
