"""Every error the bridge can answer, produced by a request: each reason of the table through a
real gRPC status (a backend that answers it), the ones a real server produces on its own (unknown
model, bad input, loading, failed load, queue full, a failing batch, a deadline), malformed and
oversized bodies, a backend that goes away and comes back, and a client that disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import pytest
import pytest_asyncio
from sie_bridge.app import MAX_LINE_BYTES
from sie_sdk.reasons import REASONS, reason_names
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.errors import SIEServerError
from sie_server.grpc_api.errors import status_for
from yarl import URL

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged
from tests.fakes import FakeAdapter
from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    eventually,
    fake_entry,
    serving,
    write_catalog_entry,
)

FAKE = "fake/model"


class ReasonBackend(encode_pb2_grpc.EncodeServiceServicer):
    """Answers ``Encode(model="reason/<REASON>")`` with that reason, exactly as the server does."""

    async def Encode(
        self, request: encode_pb2.EncodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> encode_pb2.EncodeResponse:
        name = request.model.removeprefix("reason/")
        error_class = type("Raised", (SIEServerError,), {"reason": name})
        code, message, trailers = status_for(error_class(f"raised {name}", model=request.model))
        await context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("unreachable")


@pytest_asyncio.fixture(loop_scope="session")
async def reason_backend() -> AsyncIterator[str]:
    server = grpc.aio.server()
    encode_pb2_grpc.add_EncodeServiceServicer_to_server(ReasonBackend(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_every_reason_maps_to_its_status_body_and_retry_after(reason_backend: str) -> None:
    assert set(REASONS) == set(reason_names()), "one row per ErrorReason"
    async with bridged(reason_backend) as http:
        for name in reason_names():
            model = f"reason/{name}"
            async with http.session.post(
                f"/v1/encode/{model}", json={"items": [{"text": "a"}]}
            ) as response:
                row = REASONS[name]
                assert response.status == row.http_status, name
                assert response.content_type == "application/json"
                body = await response.json()
                assert body == {
                    "detail": {"code": name, "message": f"raised {name}", "model": model}
                }
                retry_after = response.headers.get("Retry-After")
                if row.retry_after_s is None:
                    assert retry_after is None, name
                else:
                    assert retry_after is not None, name
                    assert int(retry_after) >= 1


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    write_catalog_entry(folder, fake_entry(FAKE, load_options={"fail_word": "boom"}))
    write_catalog_entry(folder, fake_entry("fake/lazy", load_options={"delay_s": 0.2}))
    write_catalog_entry(
        folder,
        {
            "name": "tiny/broken",
            "adapter": "dense",
            "weights_path": str(tmp_path / "missing"),
            "max_sequence_length": 64,
            "outputs": {"dense": {"dims": 8}},
        },
    )
    return folder


@pytest_asyncio.fixture(loop_scope="session")
async def server(catalog: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog], [FAKE], max_pending_tokens=30) as handle:
        yield handle


def fake_of(server: ServerHandle) -> FakeAdapter:
    adapter = server.running.registry.entry(FAKE).adapter
    assert isinstance(adapter, FakeAdapter)
    return adapter


def pending(server: ServerHandle) -> int:
    executor = server.running.registry.entry(FAKE).executor
    assert executor is not None
    return executor.pending_items


async def post(http: BridgeHandle, path: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
    async with http.session.post(path, json=body, headers=JSON_HEADERS, **kwargs) as response:
        return response.status, await response.json(), response.headers


def words(tag: str, n: int = 8) -> str:
    return " ".join([tag, *(f"w{i}" for i in range(n - 1))])


async def test_errors_a_real_server_produces(server: ServerHandle) -> None:
    async with bridged(server.address) as http:
        status, body, _ = await post(http, "/v1/encode/no/such-model", {"items": [{"text": "a"}]})
        assert (status, body["detail"]["code"]) == (404, "MODEL_NOT_FOUND")
        assert body["detail"]["message"] == "Model 'no/such-model' not found"

        body_in = {"items": [{"text": "a"}], "params": {"output_types": ["sparse"]}}
        status, body, _ = await post(http, f"/v1/encode/{FAKE}", body_in)
        assert (status, body["detail"]["code"]) == (400, "INVALID_INPUT")

        status, body, headers = await post(http, "/v1/encode/fake/lazy", {"items": [{"text": "a"}]})
        assert (status, body["detail"]["code"]) == (503, "MODEL_LOADING")
        assert int(headers["Retry-After"]) >= 1

        status, body, _ = await post(http, "/v1/encode/tiny/broken", {"items": [{"text": "a"}]})
        assert status == 503  # the load starts in the background
        await eventually(
            lambda: server.running.registry.entry("tiny/broken").state.value == "failed",
            "the broken model's load fails",
        )
        status, body, headers = await post(
            http, "/v1/encode/tiny/broken", {"items": [{"text": "a"}]}
        )
        assert (status, body["detail"]["code"]) == (502, "MODEL_LOAD_FAILED")
        assert "Retry-After" not in headers

        status, body, _ = await post(http, f"/v1/encode/{FAKE}", {"items": [{"text": "boom now"}]})
        assert (status, body["detail"]["code"]) == (500, "INFERENCE_ERROR")
        assert "refuses 'boom'" in body["detail"]["message"]


async def test_queue_full_and_deadline_through_the_bridge(server: ServerHandle) -> None:
    adapter = fake_of(server)
    async with (
        bridged(server.address) as http,
        bridged(server.address, request_timeout_s=0.5) as short,
    ):
        adapter.hold()
        try:
            running = asyncio.create_task(
                post(http, f"/v1/encode/{FAKE}", {"items": [{"text": words("run")}]})
            )
            await eventually(lambda: pending(server) == 1, "one call admitted")
            queued = asyncio.create_task(
                post(http, f"/v1/encode/{FAKE}", {"items": [{"text": words("q")}]})
            )
            await eventually(lambda: pending(server) == 2, "a second call queued")
            status, body, headers = await post(
                http, f"/v1/encode/{FAKE}", {"items": [{"text": words("a")}, {"text": words("b")}]}
            )
            assert (status, body["detail"]["code"]) == (503, "QUEUE_FULL")
            assert int(headers["Retry-After"]) >= 1
            status, body, headers = await post(
                short, f"/v1/encode/{FAKE}", {"items": [{"text": "late"}]}
            )
            assert (status, body["detail"]["code"]) == (504, "DEADLINE_EXCEEDED")
        finally:
            adapter.release()
        for task in (running, queued):
            status, _, _ = await asyncio.wait_for(task, HANG_GUARD_S)
            assert status == 200
        assert "late" not in adapter.seen_texts(), "expired work never reached the model"


async def test_a_client_that_disconnects_cancels_its_queued_work(server: ServerHandle) -> None:
    adapter = fake_of(server)
    async with bridged(server.address) as http:
        adapter.hold()
        try:
            running = asyncio.create_task(
                post(http, f"/v1/encode/{FAKE}", {"items": [{"text": words("run")}]})
            )
            await eventually(lambda: pending(server) == 1, "the model is busy")
            async with aiohttp.ClientSession(http.url) as impatient:
                doomed = asyncio.create_task(
                    impatient.post(f"/v1/encode/{FAKE}", json={"items": [{"text": words("gone")}]})
                )
                await eventually(lambda: pending(server) == 2, "the impatient call is queued")
                doomed.cancel()
            await eventually(lambda: pending(server) == 1, "the server dropped the call")
        finally:
            adapter.release()
        status, _, _ = await asyncio.wait_for(running, HANG_GUARD_S)
        assert status == 200
        assert not any(text.startswith("gone") for text in adapter.seen_texts())


@pytest.mark.parametrize(
    ("data", "content_type", "fragment"),
    [
        (b"{bad", "application/json", "malformed JSON body"),
        (b"\xc1", "application/msgpack", "malformed msgpack body"),
        (b"", "application/json", "request body is empty"),
        (b"[1, 2]", "application/json", "body must be an object"),
        (
            b'{"items": [{"text": "a", "txt": "b"}]}',
            "application/json",
            "unknown field items[0].txt",
        ),
        (b'{"items": "a"}', "application/json", "items must be a list"),
        (b'{"items": [{"text": 5}]}', "application/json", "items[0].text must be a string"),
        (b'{"params": {}}', "application/json", "items is required"),
        (b'{"items": [{"text": "\xff"}]}', "application/json", "malformed JSON body"),
        (b"\x81\xa5items\x91\x81\xa4text\xa1\xff", "application/msgpack", "malformed msgpack"),
    ],
)
async def test_malformed_bodies_are_400(
    server: ServerHandle, data: bytes, content_type: str, fragment: str
) -> None:
    async with bridged(server.address) as http:
        headers = {"Content-Type": content_type}
        async with http.session.post(f"/v1/encode/{FAKE}", data=data, headers=headers) as r:
            assert r.status == 400
            body = await r.json()
    assert body["detail"]["code"] == "INVALID_INPUT"
    assert fragment in body["detail"]["message"]


async def test_oversized_bodies_unknown_routes_and_methods(server: ServerHandle) -> None:
    async with bridged(server.address, max_body_bytes=1000) as http:
        big = {"items": [{"text": "x" * 2000}]}
        async with http.session.post(f"/v1/encode/{FAKE}", json=big) as r:
            assert r.status == 413
            assert (await r.json())["detail"]["code"] == "REQUEST_TOO_LARGE"
        async with http.session.get("/v2/nothing") as r:
            assert r.status == 404
            assert (await r.json())["detail"]["code"] == "NOT_FOUND"
        async with http.session.get(f"/v1/encode/{FAKE}") as r:
            assert r.status == 405
            assert (await r.json())["detail"]["code"] == "METHOD_NOT_ALLOWED"


async def test_backend_down_mid_load_answers_503_then_recovers(catalog: Path) -> None:
    statuses: list[int] = []
    codes: set[str] = set()

    async def client(http: BridgeHandle, stop: asyncio.Event) -> None:
        while not stop.is_set():
            status, body, _ = await post(http, f"/v1/encode/{FAKE}", {"items": [{"text": "a b"}]})
            statuses.append(status)
            if status != 200:
                codes.add(body["detail"]["code"])
            await asyncio.sleep(0.01)

    async with serving([catalog], [FAKE]) as first:
        port = first.running.port
        http_cm = bridged(first.address)
        http = await http_cm.__aenter__()
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(http, stop)) for _ in range(4)]
        await eventually(lambda: statuses.count(200) >= 8, "traffic flows")
    try:
        # The backend is gone: the bridge answers 503 and keeps serving.
        seen = len(statuses)
        await eventually(lambda: len(statuses) >= seen + 8, "requests answered while down")
        async with http.session.get("/readyz") as r:
            assert r.status == 503
        async with http.session.get("/healthz") as r:
            assert r.status == 200
        async with serving([catalog], [FAKE], port=port):
            down = len(statuses)
            await eventually(
                lambda: statuses[down:].count(200) >= 8, "the bridge recovers when it returns"
            )
            async with http.session.get("/readyz") as r:
                assert r.status == 200
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), HANG_GUARD_S)
    finally:
        stop.set()
        await http_cm.__aexit__(None, None, None)
    assert set(statuses) <= {200, 503}, "never a 500"
    assert 503 in statuses
    assert codes <= {"BACKEND_UNAVAILABLE", "SHUTTING_DOWN"}


#: Model names a hostile client might try: climbing out of a folder, an encoded slash, a name
#: far past any real one, and control and non-ASCII characters.
TRICKY_NAMES = [
    "../../etc/passwd",
    "..",
    "fake/../fake/errors",
    "fake%2Ferrors",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "x" * 10_000,
    f"{FAKE}:{'p' * 10_000}",
    "a:b:c",
    "caf\u00e9/\u2603",
]


@pytest.mark.parametrize("name", TRICKY_NAMES, ids=lambda n: n[:24])
async def test_hostile_model_names_are_refused_briefly_on_both_transports(
    server: ServerHandle, name: str
) -> None:
    """Never a file read, a 500 or a hang: 404 through the bridge (``MODEL_NOT_FOUND``, or
    ``NOT_FOUND`` where the dot segments take the path off the route) and NOT_FOUND over gRPC
    (an unknown profile of a real model: 400 and INVALID_ARGUMENT), with a message that stays
    short (the server repeats a long name shortened: whole, its trailers would pass the 16 KiB
    gRPC clients accept); the model still serves."""
    async with bridged(server.address) as http, aiohttp.ClientSession() as raw:
        url = URL(f"{http.url}/v1/encode/{quote(name, safe='/%:')}", encoded=True)
        async with raw.post(url, json={"items": [{"text": "a"}]}, headers=JSON_HEADERS) as r:
            status, body = r.status, await r.json()
        if name.startswith(f"{FAKE}:"):  # a model that exists, with a profile that does not
            assert (status, body["detail"]["code"]) == (400, "INVALID_INPUT"), body
        else:
            assert status == 404, body
            assert body["detail"]["code"] in ("MODEL_NOT_FOUND", "NOT_FOUND"), body
        assert len(body["detail"]["message"]) < 400
        status, body, _ = await post(http, f"/v1/encode/{FAKE}", {"items": [{"text": "a"}]})
        assert status == 200
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Encode(
            encode_pb2.EncodeRequest(model=name, items=[common_pb2.Item(text="a")]), timeout=10
        )
    expected = "INVALID_ARGUMENT" if name.startswith(f"{FAKE}:") else "NOT_FOUND"
    assert refused.value.code().name == expected, refused.value.details()
    assert len(refused.value.details() or "") < 400


async def test_a_request_line_past_the_bridges_limit_gets_a_400_and_the_bridge_serves_on(
    server: ServerHandle,
) -> None:
    """Past ``MAX_LINE_BYTES`` aiohttp answers its own plain-text 400 before the app."""
    async with bridged(server.address) as http, aiohttp.ClientSession() as raw:
        url = URL(f"{http.url}/v1/encode/{'x' * (MAX_LINE_BYTES + 10)}", encoded=True)
        async with raw.post(url, json={"items": [{"text": "a"}]}) as response:
            assert response.status == 400
            assert "more than" in await response.text()
        status, _, _ = await post(http, f"/v1/encode/{FAKE}", {"items": [{"text": "a"}]})
        assert status == 200
