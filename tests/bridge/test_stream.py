"""``POST /v1/encode/:model/stream`` through a real bridge in front of a fake-adapter server: many
NDJSON lines stream through in order, each result equal to ``/v1/encode`` for the same body; bad
lines (malformed JSON, invalid requests, too long) answer error lines and the stream goes on; the
checks before the stream (content type, window, unknown model, backend down) are normal error
responses; a client that disconnects frees its queued work on the server; a backend that fails
mid-stream ends the response with an error line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from sie_bridge.routes.stream import NDJSON, error_line
from sie_sdk.reasons import ErrorDetail

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged
from tests.fakes import FakeAdapter
from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    eventually,
    fake_entry,
    free_port,
    serving,
    write_catalog_entry,
)

MODEL = "fake/ndjson"
STREAM = f"/v1/encode/{MODEL}/stream"
NDJSON_HEADERS = {"Content-Type": NDJSON}
Body = dict[str, Any]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServerHandle]:
    catalog = tmp_path_factory.mktemp("ndjson") / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL))
    async with serving([catalog], preload=[MODEL]) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


def body(sequence: int, count: int) -> Body:
    texts = [f"line {sequence} text {i}" for i in range(count)]
    return {"items": [{"id": f"{sequence}-{i}", "text": t} for i, t in enumerate(texts)]}


def ndjson(lines: Iterable[bytes], chunk: int = 997) -> Iterator[bytes]:
    """The lines as one byte stream cut in ``chunk``-byte pieces (lines split across chunks)."""
    pending = b""
    for line in lines:
        pending += line + b"\n"
        while len(pending) >= chunk:
            yield pending[:chunk]
            pending = pending[chunk:]
    if pending:
        yield pending


async def chunks(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A streamed (chunked) request body: aiohttp sends each piece as it is produced."""
    for piece in pieces:
        yield piece


async def stream(
    http: BridgeHandle, lines: Iterable[bytes], path: str = STREAM
) -> list[dict[str, Any]]:
    """POST the lines, check the response is a 200 NDJSON stream, and return its lines."""
    async with http.session.post(
        path, data=chunks(ndjson(lines)), headers=NDJSON_HEADERS
    ) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == NDJSON
        assert "X-SIE-Server-Version" in response.headers
        return [json.loads(line) async for line in response.content if line.strip()]


async def unary(http: BridgeHandle, payload: Body) -> dict[str, Any]:
    async with http.session.post(
        f"/v1/encode/{MODEL}", data=json.dumps(payload), headers=JSON_HEADERS
    ) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


def without_timing(result: dict[str, Any]) -> dict[str, Any]:
    """A response less its timing (which differs from call to call)."""
    assert set(result["timing"]) >= {"total_ms", "inference_ms"}
    return {key: value for key, value in result.items() if key != "timing"}


def dumped(payload: Any) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.asyncio(loop_scope="session")
async def test_many_lines_stream_in_order_equal_to_unary_encode(http: BridgeHandle) -> None:
    bodies = [body(sequence, 20) for sequence in range(1, 501)]
    lines = await stream(http, (dumped(b) for b in bodies), f"{STREAM}?window=8")
    assert [line["sequence"] for line in lines] == list(range(1, 501))
    assert all(set(line) == {"sequence", "result"} for line in lines)
    limit = asyncio.Semaphore(16)

    async def expected(payload: Body) -> dict[str, Any]:
        async with limit:
            return await unary(http, payload)

    unaries = await asyncio.gather(*(expected(b) for b in bodies))
    for line, reference, sent in zip(lines, unaries, bodies, strict=True):
        assert without_timing(line["result"]) == without_timing(reference)
        assert [item["id"] for item in line["result"]["items"]] == [i["id"] for i in sent["items"]]


@pytest.mark.asyncio(loop_scope="session")
async def test_bad_lines_answer_errors_and_the_stream_goes_on(http: BridgeHandle) -> None:
    good = {n: body(n, 3) for n in (1, 2, 4, 6, 8, 9)}
    lines = [
        dumped(good[1]),
        dumped(good[2]),
        b'{"items": [{"text": "cut short"',  # 3: not JSON
        dumped(good[4]),
        dumped({"items": [{"text": "x", "colour": "red"}]}),  # 5: refused by the bridge
        dumped(good[6]),
        dumped({"items": [{"text": "x"}], "params": {"output_types": ["sparse"]}}),  # 7: server
        b"   ",  # blank: skipped, not counted
        dumped(good[8]),
        dumped(good[9]),
    ]
    answers = await stream(http, lines)
    assert [a["sequence"] for a in answers] == list(range(1, 10))
    by_sequence = {a["sequence"]: a for a in answers}
    for sequence in (3, 5, 7):
        error = by_sequence[sequence]["error"]
        assert error["code"] == "INVALID_INPUT", error
        assert error["message"]
    assert "malformed JSON" in by_sequence[3]["error"]["message"]
    assert "colour" in by_sequence[5]["error"]["message"]
    assert by_sequence[7]["error"].get("model") == MODEL  # the server's own refusal
    for sequence, payload in good.items():
        reference = await unary(http, payload)
        assert without_timing(by_sequence[sequence]["result"]) == without_timing(reference)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_line_over_the_body_limit_is_refused_alone(server: ServerHandle) -> None:
    async with bridged(server.address, max_body_bytes=2000) as http:
        lines = [dumped(body(1, 2)), dumped(body(2, 200)), dumped(body(3, 2))]
        assert len(lines[1]) > 2000 > len(lines[0])
        answers = await stream(http, lines)
    assert [a["sequence"] for a in answers] == [1, 2, 3]
    assert answers[1]["error"]["code"] == "REQUEST_TOO_LARGE"
    assert [item["id"] for item in answers[2]["result"]["items"]] == ["3-0", "3-1"]


@pytest.mark.asyncio(loop_scope="session")
async def test_an_empty_body_is_an_empty_stream(http: BridgeHandle) -> None:
    assert await stream(http, []) == []


async def refused(http: BridgeHandle, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with http.session.post(path, **kwargs) as response:
        assert response.content_type == "application/json"
        detail: dict[str, Any] = (await response.json())["detail"]
        return response.status, detail


@pytest.mark.asyncio(loop_scope="session")
async def test_checks_before_the_stream_are_normal_error_responses(
    http: BridgeHandle,
) -> None:
    line = dumped(body(1, 1))
    for content_type in ("application/msgpack", "text/plain"):
        status, detail = await refused(
            http, STREAM, data=line, headers={"Content-Type": content_type}
        )
        assert (status, detail["code"]) == (400, "INVALID_INPUT")
        assert NDJSON in detail["message"]
    for window in ("0", "-1", "lots"):
        status, detail = await refused(
            http, f"{STREAM}?window={window}", data=line, headers=NDJSON_HEADERS
        )
        assert (status, detail["code"]) == (400, "INVALID_INPUT"), window
    status, detail = await refused(
        http, "/v1/encode/no/such-model/stream", data=line, headers=NDJSON_HEADERS
    )
    assert (status, detail["code"]) == (404, "MODEL_NOT_FOUND")
    # application/json is read as NDJSON: a one-line body is a stream of one request.
    async with http.session.post(STREAM, data=line, headers=JSON_HEADERS) as response:
        assert response.status == 200
        assert [json.loads(x)["sequence"] async for x in response.content] == [1]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_backend_that_is_down_is_a_503_before_the_stream() -> None:
    async with bridged(f"127.0.0.1:{free_port()}") as http:
        status, detail = await refused(
            http, STREAM, data=dumped(body(1, 1)), headers=NDJSON_HEADERS
        )
    assert (status, detail["code"]) == (503, "BACKEND_UNAVAILABLE")


def fake_of(server: ServerHandle) -> FakeAdapter:
    adapter = server.running.registry.entry(MODEL).adapter
    assert isinstance(adapter, FakeAdapter)
    return adapter


def pending_items(server: ServerHandle) -> int:
    """Items the model's executor has admitted and not yet resolved."""
    executor = server.running.registry.entry(MODEL).executor
    assert executor is not None
    return executor.pending_items


async def paused_body(before: int, release: asyncio.Event, after: int = 0) -> AsyncIterator[bytes]:
    """An NDJSON body that sends ``before`` lines, waits for ``release``, then sends ``after``
    more (a client still uploading its stream)."""
    for sequence in range(1, before + 1):
        yield dumped(body(sequence, 3)) + b"\n"
    await release.wait()
    for sequence in range(before + 1, before + after + 1):
        yield dumped(body(sequence, 3)) + b"\n"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_client_that_disconnects_cancels_its_queued_work(
    server: ServerHandle, http: BridgeHandle
) -> None:
    """The model is held by a unary call, so the stream's window of requests waits queued in the
    executor; dropping the connection (the client's task cancelled mid-upload, nothing read)
    must cancel the bridge's handler and so its gRPC call, and free exactly that work."""
    window, per_request = 4, 3
    adapter = fake_of(server)
    warmup = adapter.passes_started
    never = asyncio.Event()  # the body never ends by itself: only the disconnect ends it
    async with asyncio.timeout(3 * HANG_GUARD_S):
        adapter.hold()
        try:
            first = asyncio.create_task(
                unary(http, {"items": [{"id": "held", "text": "saturating first"}]})
            )
            await eventually(lambda: adapter.passes_started == warmup + 1, "the model is busy")
            async with aiohttp.ClientSession(http.url) as client:

                async def upload() -> None:
                    async with client.post(
                        f"{STREAM}?window={window}",
                        data=paused_body(2 * window, never),
                        headers=NDJSON_HEADERS,
                    ) as response:
                        await response.read()  # never returns: the body never ends

                doomed = asyncio.create_task(upload())
                await eventually(
                    lambda: pending_items(server) == 1 + window * per_request,
                    "the stream's window is queued behind the held pass",
                )
                doomed.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await doomed
            await eventually(
                lambda: pending_items(server) == 1,
                "the disconnected stream's queued work is freed (the bridge cancelled its call)",
            )
        finally:
            adapter.release()
        assert [item["id"] for item in (await first)["items"]] == ["held"]
        await eventually(lambda: pending_items(server) == 0, "the executor is empty")
        ran = [p.texts for p in adapter.passes[warmup:]]
        assert ran == [("saturating first",)], "no streamed item reached the model"
        after = body(1, 2)
        result = await unary(http, after)
        assert [item["id"] for item in result["items"]] == ["1-0", "1-1"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_backend_that_fails_mid_stream_ends_with_an_error_line(tmp_path: Path) -> None:
    """Three lines are answered, then the server stops while the body is paused; the next line
    read cannot be answered, so the response ends with an error line for it (the mapped reason
    of the failed gRPC stream) and never answers the lines after it."""
    before, after = 3, 3
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL))
    release = asyncio.Event()
    async with (
        asyncio.timeout(3 * HANG_GUARD_S),
        serving([catalog], preload=[MODEL]) as backend,
        bridged(backend.address) as http,
        http.session.post(
            STREAM, data=paused_body(before, release, after), headers=NDJSON_HEADERS
        ) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.content_type == NDJSON
        answers = [json.loads(await response.content.readline()) for _ in range(before)]
        await backend.running.stop(0)
        release.set()
        answers += [json.loads(line) async for line in response.content if line.strip()]
    assert [a["sequence"] for a in answers] == list(range(1, before + 2))
    for sequence, answer in enumerate(answers[:before], start=1):
        ids = [item["id"] for item in answer["result"]["items"]]
        assert ids == [f"{sequence}-{i}" for i in range(3)]
    last = answers[-1]
    assert set(last) == {"sequence", "error"}, last
    assert last["error"]["code"] == "BACKEND_UNAVAILABLE", last
    assert len(answers) < before + after


def test_an_error_line_carries_the_retry_hint_a_unary_response_sends_as_retry_after() -> None:
    """A line has no headers: the hint is ``retry_after_ms`` (what the SDK's HTTP transport
    reads); without a hint the line has no such field."""
    hinted = json.loads(error_line(3, ErrorDetail("QUEUE_FULL", "busy", retry_after_s=1.25)))
    assert hinted == {
        "sequence": 3,
        "error": {"code": "QUEUE_FULL", "message": "busy", "retry_after_ms": 1250},
    }
    plain = json.loads(error_line(4, ErrorDetail("INVALID_INPUT", "bad")))
    assert plain == {"sequence": 4, "error": {"code": "INVALID_INPUT", "message": "bad"}}
