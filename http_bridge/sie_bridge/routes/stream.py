"""``POST /v1/encode/:model/stream``: bulk encode as NDJSON over the server's ``EncodeStream``.

The body is NDJSON (``application/x-ndjson``; ``application/json`` is read the same way): one JSON
object a line, each exactly the body ``/v1/encode/:model`` takes. The answer is NDJSON too, one
line per request line, in order: ``{"sequence": n, "result": <the /v1/encode JSON response>}`` or
``{"sequence": n, "error": {"code", "message", ...}}`` (the fields of the bridge's error bodies,
``sie_bridge.errors``). ``sequence`` counts the request lines from 1 (blank lines are skipped).

* Before the ``200``: the content type, the ``window`` query parameter and the model are checked
  (the model by the server's ``GetModel``, which also checks the backend and the API key), and
  failures are the normal error responses with their statuses.
* Streaming: a reader task reads the body line by line as it arrives and writes each request to
  the gRPC stream; ``call.write`` waits for gRPC flow control, so while the server's window is
  full the bridge stops reading the body and TCP holds the client back: memory stays bounded
  (one line, at most ``--max-body-bytes``, plus what the server holds) whatever the length.
* A line that is not JSON, not a valid request or over ``--max-body-bytes`` is answered here as
  an ``error`` line for its sequence and is not sent; the other lines keep their line numbers as
  their gRPC ``sequence`` (the server answers in the order it receives them), so the answerer
  interleaves the local errors with the server's answers through one FIFO of slots.
* If the gRPC stream fails midway, the last line is an ``error`` line (the mapped reason, e.g.
  BACKEND_UNAVAILABLE) for the first request not answered, and the response ends: a response
  with fewer lines than requests is incomplete.
* The stream has no deadline (it lasts as long as its body); a client that disconnects cancels
  the handler (``handler_cancellation``), which cancels the gRPC call and so its queued work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aiohttp import StreamReader, web
from aiohttp.http_exceptions import BadHttpMessage
from sie_sdk.convert import from_proto as responses
from sie_sdk.convert import to_proto as requests
from sie_sdk.reasons import REASONS, ErrorDetail, error_from_rpc
from sie_sdk.v1 import encode_pb2, models_pb2
from sie_sdk.wire import JSON, WireError, dump_json, load_json

from sie_bridge.errors import error_body, invalid_input
from sie_bridge.negotiate import SERVER_VERSION, VERSION_HEADER
from sie_bridge.state import SETTINGS, UPSTREAM

NDJSON = "application/x-ndjson"
#: Request content types read as NDJSON (a one-line JSON body is an NDJSON body of one line).
READABLE = frozenset({NDJSON, JSON})
#: Slots between the body reader and the answerer: a few windows' worth (each is tiny; the
#: requests themselves are bounded by gRPC flow control and the server's window).
MAX_SLOTS = 256
StreamCall = grpc.aio.StreamStreamCall[
    encode_pb2.EncodeStreamRequest, encode_pb2.EncodeStreamResponse
]


@dataclass(frozen=True, slots=True)
class _Sent:
    """A request line written to the gRPC stream: the server answers it, in order."""

    sequence: int


@dataclass(frozen=True, slots=True)
class _Refused:
    """A request line answered here (not sent): why it was refused."""

    sequence: int
    detail: ErrorDetail


@dataclass(frozen=True, slots=True)
class _End:
    """The body ended; ``detail`` when reading it failed (answered for ``sequence``)."""

    sequence: int = 0
    detail: ErrorDetail | None = None


_Slot = _Sent | _Refused | _End


def _content_type(request: web.Request) -> None:
    """400 unless the body is NDJSON (or JSON, read as NDJSON)."""
    if request.content_type not in READABLE:
        raise invalid_input(
            f"this endpoint takes Content-Type: {NDJSON} (one JSON request a line), "
            f"not {request.content_type}"
        )


def _window(raw: str | None) -> int:
    """The ``window`` query parameter (0 when absent: the server's default)."""
    if raw is None:
        return 0
    if not raw.isdecimal():
        raise invalid_input("window must be a positive integer")
    return requests.positive_int(int(raw), "window")


async def lines(content: StreamReader, limit: int) -> AsyncIterator[bytes | None]:
    """Each non-blank line of ``content`` as it arrives; None for a line over ``limit`` bytes,
    whose bytes are dropped as they come (never more than ``limit`` buffered)."""
    buffer, too_long = bytearray(), False
    async for chunk in content.iter_any():
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            if too_long or len(buffer) + len(piece) > limit:
                yield None
            elif (line := bytes(buffer + piece)).strip():
                yield line
            buffer.clear()
            too_long = False
        if not too_long:
            buffer += rest
            too_long = len(buffer) > limit
            if too_long:
                buffer.clear()
    if too_long:
        yield None
    elif buffer.strip():
        yield bytes(buffer)


def stream_error(error: encode_pb2.StreamError) -> ErrorDetail:
    """A refused request of the stream as the detail its unary call would have failed with."""
    metadata = dict(error.metadata)
    return ErrorDetail(
        error.reason if error.reason in REASONS else "INTERNAL_ERROR",
        error.message,
        model=metadata.get("model"),
        retry_after_s=error.retry_after_ms / 1000 if error.retry_after_ms else None,
        metadata=metadata,
    )


def error_line(sequence: int, detail: ErrorDetail) -> bytes:
    """An ``error`` line: the fields of the bridge's error bodies, and ``retry_after_ms`` when
    retrying helps (a unary response would send ``Retry-After``; a line has no headers)."""
    error = error_body(detail)["detail"]
    if detail.retry_after_s:
        error["retry_after_ms"] = round(detail.retry_after_s * 1000)
    return dump_json({"sequence": sequence, "error": error}) + b"\n"


def result_line(message: encode_pb2.EncodeStreamResponse) -> bytes:
    """The answer line of one server message: its result as ``/v1/encode`` renders it as JSON."""
    if message.WhichOneof("result") == "error":
        return error_line(message.sequence, stream_error(message.error))
    try:
        result = responses.encode_response(message.response)
        return dump_json({"sequence": message.sequence, "result": result}) + b"\n"
    except ValueError:  # NaN or infinity, as in negotiate.reply
        detail = ErrorDetail("INFERENCE_ERROR", "the result holds NaN or infinity, not JSON")
        return error_line(message.sequence, detail)


class _Stream:
    """One NDJSON stream: ``read`` feeds the gRPC call from the body, ``answer`` writes a line
    for each slot, in order."""

    def __init__(
        self, request: web.Request, response: web.StreamResponse, call: StreamCall, window: int
    ) -> None:
        self.request, self.response, self.call, self.window = request, response, call, window
        self.model = request.match_info["model"]
        self.limit = request.app[SETTINGS].max_body_bytes
        self.slots: asyncio.Queue[_Slot] = asyncio.Queue(maxsize=MAX_SLOTS)
        self.sent = 0

    async def run(self) -> None:
        reader = asyncio.create_task(self.read())
        try:
            await self.answer()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def read(self) -> None:
        """Every line to a slot (and a sent request), then the end of the body."""
        sequence, end = 0, _End()
        try:
            async for line in lines(self.request.content, self.limit):
                sequence += 1
                await self.forward(sequence, line)
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended: the answerer reads why from it
        except (OSError, BadHttpMessage) as exc:
            detail = ErrorDetail("INVALID_INPUT", f"reading the request body failed: {exc}")
            end = _End(sequence + 1, detail)
        await self.slots.put(end)

    async def forward(self, sequence: int, line: bytes | None) -> None:
        """Send the line's request, or queue its refusal when it is not one."""
        if line is None:
            message = f"line {sequence} is over the bridge's limit of {self.limit} bytes"
            await self.slots.put(_Refused(sequence, ErrorDetail("REQUEST_TOO_LARGE", message)))
            return
        try:
            request = requests.encode_request(self.model, load_json(line))
        except WireError as exc:
            await self.slots.put(_Refused(sequence, ErrorDetail("INVALID_INPUT", str(exc))))
            return
        await self.slots.put(_Sent(sequence))
        window = self.window if self.sent == 0 else 0  # the server reads the first message's
        self.sent += 1
        await self.call.write(
            encode_pb2.EncodeStreamRequest(sequence=sequence, request=request, window=window)
        )

    async def answer(self) -> None:
        """One line per slot until the end of the body, or until the gRPC stream fails."""
        while not isinstance(slot := await self.slots.get(), _End):
            if isinstance(slot, _Refused):
                await self.response.write(error_line(slot.sequence, slot.detail))
            elif not await self.relay(slot.sequence):
                return
        if slot.detail is not None:
            await self.response.write(error_line(slot.sequence, slot.detail))

    async def relay(self, sequence: int) -> bool:
        """Write the server's answer to ``sequence``; False (after a last error line) when the
        stream failed instead."""
        try:
            message = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            await self.response.write(error_line(sequence, error_from_rpc(exc)))
            return False
        if not isinstance(message, encode_pb2.EncodeStreamResponse) or message.sequence != sequence:
            detail = ErrorDetail("INTERNAL_ERROR", f"the server's stream did not answer {sequence}")
            await self.response.write(error_line(sequence, detail))
            return False
        await self.response.write(result_line(message))
        return True


async def encode_stream(request: web.Request) -> web.StreamResponse:
    """Check what can fail as a normal error response, then stream (module docstring)."""
    _content_type(request)
    window = _window(request.query.get("window"))
    upstream = request.app[UPSTREAM]
    model = models_pb2.GetModelRequest(name=request.match_info["model"])
    await upstream.call(upstream.models.GetModel, model)
    call: StreamCall = upstream.encode.EncodeStream(None, metadata=upstream.metadata())
    try:
        response = web.StreamResponse(headers={VERSION_HEADER: SERVER_VERSION})
        response.content_type = NDJSON
        await response.prepare(request)
        await _Stream(request, response, call, window).run()
        await response.write_eof()
    finally:
        call.cancel()  # a no-op once the call is done; else (client gone) frees its queued work
    return response


def add_routes(app: web.Application) -> None:
    """Must come before ``/v1/encode/{model:.+}``, which would match ``.../stream`` too."""
    app.router.add_post("/v1/encode/{model:.+}/stream", encode_stream)
