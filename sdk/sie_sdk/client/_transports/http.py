"""The HTTP transport: through the bridge, msgpack both ways (``sie_sdk.wire``), with httpx.

Requests carry ``Content-Type``/``Accept: application/msgpack``, ``X-SIE-SDK-Version`` and, with an
API key, ``Authorization: Bearer``. A 2xx body decodes into the HTTP API's shape with vectors as
numpy views; any other status is read as ``{"detail": {"code", "message", ...}}`` (JSON or
msgpack, by ``Content-Type``) plus ``Retry-After`` and raised through the reason table, exactly as
the gRPC transport raises the same reason. Connection failures become ``SIEConnectionError``.
The status stream is the bridge's ``/ws/status`` (``websockets``). ``HttpTransport`` and
``AsyncHttpTransport`` share everything but the waiting.

``encode_stream`` goes through the bridge's ``POST /v1/encode/:model/stream`` (NDJSON both ways,
so JSON: bytes as base64, vectors as lists turned back into numpy arrays of the line's dtype).
httpx over HTTP/1.1 sends a whole body before it reads the answer, and the client's batch
iterator blocks while ``max_unacked(window)`` batches are unanswered, so one POST cannot carry the
whole stream: each POST carries the batches taken so far (at most ``max_unacked``) and their
answers are yielded as their lines arrive; then the next POST. The bridge stops reading a body
while the server's window is full and the client does not read answers while it sends, so the
batches past the server's window must fit in the buffers between them: they are capped at
``OVERFLOW_BYTES`` (the rest waits for the next POST). An answer line numbers the lines of its
POST from 1; it is mapped back to the batch's own sequence. A response that ends before every
line is answered is a failed stream (its last line says why, e.g. BACKEND_UNAVAILABLE): raised,
so the client resumes; an error line the stream went on after is that batch's error.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import numpy.typing as npt

from sie_sdk import __version__
from sie_sdk.client._stream import max_unacked
from sie_sdk.client._transports.base import CallOptions, Kind, Operation
from sie_sdk.client.errors import (
    RequestError,
    ServerError,
    SIEConnectionError,
    SIEError,
    error_from_detail,
)
from sie_sdk.reasons import REASONS, ErrorDetail
from sie_sdk.tensors import DTYPE_BY_NAME, DTYPE_TO_NUMPY
from sie_sdk.v1 import common_pb2
from sie_sdk.wire import (
    MSGPACK,
    WireError,
    dump_json,
    is_msgpack,
    load_json,
    pack_msgpack,
    unpack_msgpack,
)

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the HTTP transport needs httpx and websockets: pip install 'sie[http]'"
    ) from exc


def _headers(call: CallOptions) -> dict[str, str]:
    headers = {"Accept": MSGPACK, "Content-Type": MSGPACK, "X-SIE-SDK-Version": __version__}
    if call.api_key:
        headers["Authorization"] = f"Bearer {call.api_key}"
    return headers


def _build(
    client: httpx.Client | httpx.AsyncClient,
    op: Operation,
    body: Mapping[str, Any] | None,
    call: CallOptions,
) -> httpx.Request:
    content = pack_msgpack(dict(body)) if body is not None else None
    return client.build_request(
        op.http_method,
        op.http_path,
        content=content,
        headers=_headers(call),
        timeout=call.timeout_s,
    )


def _decode(body: bytes, content_type: str | None) -> Any:
    return unpack_msgpack(body) if is_msgpack(content_type) else load_json(body)


def _result(response: httpx.Response) -> Any:
    if response.is_success:
        return _decode(response.content, response.headers.get("Content-Type"))
    raise _error_of(response, response.content)


def _error(
    status: int, body: bytes, content_type: str | None, headers: Mapping[str, str]
) -> SIEError:
    try:
        detail = _decode(body, content_type).get("detail")
    except (WireError, AttributeError):
        detail = None
    retry = headers.get("Retry-After")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    if not isinstance(detail, Mapping):
        detail = {"message": body[:500].decode("utf-8", "replace") or f"HTTP {status}"}
    return _detail_error(detail, status, retry_after)


def _error_of(response: httpx.Response, body: bytes) -> SIEError:
    """The error of a response that is not a success (its body read)."""
    return _error(
        response.status_code, body, response.headers.get("Content-Type"), response.headers
    )


def _detail_error(detail: Mapping[str, Any], status: int, retry_after: float | None) -> SIEError:
    """The exception for an error body's ``detail`` (``status`` only picks the class of a code
    that is not one of our reasons)."""
    code = str(detail.get("code") or f"HTTP_{status}")
    message = str(detail.get("message", ""))
    metadata = {str(k): str(v) for k, v in detail.items() if k not in ("code", "message")}
    if code in REASONS:
        return error_from_detail(
            ErrorDetail(
                code, message, model=metadata.get("model"), retry_after_s=retry_after,
                metadata=metadata,
            )
        )  # fmt: skip
    # Not one of our reasons (an HTTP-level error such as NOT_FOUND from a proxy or the router).
    cls = RequestError if status < 500 else ServerError
    return cls(message, code=code, status_code=status, retry_after=retry_after)


def _connection_error(exc: Exception, base_url: str) -> SIEError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return ServerError(
            f"no answer from {base_url} within the timeout",
            code="DEADLINE_EXCEEDED",
            status_code=504,
        )
    return SIEConnectionError(
        f"cannot reach {base_url}: {exc}", code="BACKEND_UNAVAILABLE", status_code=503
    )


# ---- encode_stream: NDJSON POSTs to /v1/encode/:model/stream -----------------------------------
NDJSON = "application/x-ndjson"
#: The server works on at most this many requests of a stream at once, whatever ``window`` asks.
SERVER_MAX_WINDOW = 64
#: Bytes of a POST's batches past the server's window: they wait in the buffers between the
#: client and the server (socket, bridge, gRPC) while the client sends and does not read yet.
OVERFLOW_BYTES = 256 * 1024
#: Class of a line error whose code is not one of our reasons (none the bridge sends).
_LINE_STATUS = 500


def _stream_path(model: str) -> str:
    return Operation(Kind.ENCODE, model).http_path + "/stream"


def _stream_headers(call: CallOptions) -> dict[str, str]:
    """``_headers`` for NDJSON both ways."""
    return {**_headers(call), "Accept": NDJSON, "Content-Type": NDJSON}


def _stream_timeout(call: CallOptions) -> httpx.Timeout:
    """No read deadline: like the gRPC stream, a bulk stream lasts as long as its input (and a
    batch may wait in the server for a model to load)."""
    return httpx.Timeout(call.timeout_s, read=None)


@dataclass(frozen=True, slots=True)
class _Line:
    """A batch taken from the input and not posted yet: its NDJSON line, or why it has none."""

    sequence: int
    line: bytes | SIEError


def _line(sequence: int, body: Mapping[str, Any]) -> _Line:
    """The batch as one NDJSON line (``dump_json``: bytes as base64, arrays as lists). A body
    JSON cannot carry (NaN, an unknown type) is refused here, as the server would refuse it."""
    try:
        return _Line(sequence, dump_json(dict(body)) + b"\n")
    except (TypeError, ValueError) as exc:
        message = f"batch {sequence} cannot be sent as JSON: {exc}"
        return _Line(sequence, RequestError(message, code="INVALID_INPUT", status_code=400))


class _Posts:
    """The batches taken from the input and not posted yet, cut into POSTs (module docstring)."""

    def __init__(self, window: int) -> None:
        #: Batches taken and not answered, at most (the input blocks past it).
        self.limit = max_unacked(window)
        #: Batches the server reads at once: they never wait in buffers.
        self.free = min(window, SERVER_MAX_WINDOW)
        self.pending: deque[_Line] = deque()
        #: The input gave fewer batches than asked: it is done.
        self.exhausted = False

    @property
    def room(self) -> int:
        """How many batches to take from the input now (every posted one is answered): never
        more, so the input, which blocks past ``limit``, is never asked for one too many."""
        return 0 if self.exhausted else self.limit - len(self.pending)

    def add(self, taken: list[tuple[int, Mapping[str, Any]]], asked: int) -> None:
        """The batches taken from the input when ``asked`` for that many."""
        self.exhausted = len(taken) < asked
        self.pending.extend(_line(sequence, body) for sequence, body in taken)

    def cut(self) -> list[_Line]:
        """The next POST's batches, in order; or the first pending batch alone when it has no
        line (its error is yielded in its place); empty when nothing is pending."""
        if self.pending and isinstance(self.pending[0].line, SIEError):
            return [self.pending.popleft()]
        post: list[_Line] = []
        overflow = 0
        while self.pending and isinstance(line := self.pending[0].line, bytes):
            if len(post) >= self.free:  # free >= 1: a POST carries at least one batch
                if overflow + len(line) > OVERFLOW_BYTES:
                    break
                overflow += len(line)
            post.append(self.pending.popleft())
        return post


def _body(post: list[_Line]) -> bytes:
    return b"".join(item.line for item in post if isinstance(item.line, bytes))


def _stream_args(model: str, post: list[_Line], window: int, call: CallOptions) -> dict[str, Any]:
    """``client.stream("POST", ...)``'s arguments for one POST of ``post``'s lines."""
    return {
        "url": _stream_path(model),
        "content": _body(post),
        "params": {"window": window},
        "headers": _stream_headers(call),
        "timeout": _stream_timeout(call),
    }


def _array(values: Any, dtype: Any) -> npt.NDArray[np.generic]:
    """A read-only array of ``values`` (JSON lists) in the dtype its line names (as the unary
    msgpack path gives: a read-only view of the received bytes)."""
    name = dtype if isinstance(dtype, str) else "float32"
    numpy_dtype = DTYPE_TO_NUMPY[DTYPE_BY_NAME.get(name, common_pb2.DTYPE_FLOAT32)]
    array = np.asarray(values, dtype=numpy_dtype)
    array.flags.writeable = False
    return array


def _item_arrays(item: Mapping[str, Any]) -> dict[str, Any]:
    """One ``/v1/encode`` JSON result with its vectors as numpy arrays."""
    out = dict(item)
    if isinstance(dense := item.get("dense"), Mapping):
        out["dense"] = {**dense, "values": _array(dense["values"], dense.get("dtype"))}
    if isinstance(sparse := item.get("sparse"), Mapping):
        out["sparse"] = {
            **sparse,
            "indices": _array(sparse["indices"], "int32"),
            "values": _array(sparse["values"], sparse.get("dtype")),
        }
    if isinstance(multi := item.get("multivector"), Mapping):
        values = _array(multi["values"], multi.get("dtype"))
        if values.ndim == 1 and values.size == 0:  # no tokens: [] has lost the row width
            dims = int(multi.get("token_dims", 0))
            width = (dims + 7) // 8 if multi.get("dtype") == "binary" else dims
            values = values.reshape(0, width)
        out["multivector"] = {**multi, "values": values}
    return out


def _stream_result(result: Any) -> dict[str, Any]:
    """A result line's response in the shape the unary ``send`` returns for encode."""
    if not isinstance(result, Mapping) or not isinstance(result.get("items"), list):
        raise _protocol_error("a result line holds no encode response")
    return {**result, "items": [_item_arrays(item) for item in result["items"]]}


def _line_error(detail: Any) -> SIEError:
    """An error line's ``detail``, raised as an error body's would be; the retry hint, when the
    line carries one, is ``retry_after_ms`` (as the gRPC ``StreamError``'s)."""
    if not isinstance(detail, Mapping):
        return _protocol_error("an error line holds no error detail")
    hint = detail.get("retry_after_ms")
    retry_after = None
    if isinstance(hint, int | float) and not isinstance(hint, bool) and hint > 0:
        retry_after = hint / 1000
    return _detail_error(detail, _LINE_STATUS, retry_after)


def _protocol_error(message: str) -> SIEError:
    return SIEError(f"encode_stream: {message}", code="STREAM_PROTOCOL")


def _retried(error: SIEError) -> bool:
    """Whether the SDK retries ``error``'s reason (then a stream that ends on it is resumed)."""
    row = REASONS.get(error.code or "")
    return row is not None and row.sdk_retries


class _Answers:
    """One POST's answer lines -> (batch sequence, response or SIEError), in order.

    An error line is held until the next line (or the end) says whether the stream went on
    after it: the last line of a response that ended early, or a last line whose reason the SDK
    retries (the backend failed while answering it), ends the stream and is raised by ``end``;
    any other error line is its batch's error."""

    def __init__(self, post: list[_Line]) -> None:
        self.sequences = [item.sequence for item in post]
        self.count = 0
        self.held: tuple[int, SIEError] | None = None
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, Any]]:
        """The outcomes the lines completed by ``chunk`` give."""
        self.buffer += chunk
        end = self.buffer.rfind(b"\n")
        if end < 0:
            return []
        complete = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return [pair for line in complete.split(b"\n") for pair in self._line(line)]

    def end(self) -> list[tuple[int, Any]]:
        """The outcomes left when the response ends; raises when the stream did not finish."""
        out = self._line(bytes(self.buffer))
        self.buffer.clear()
        if self.held is not None:
            _, error = self.held
            if self.count < len(self.sequences) or _retried(error):
                raise error
            out.append(self.held)
            self.held = None
        elif self.count < len(self.sequences):
            raise SIEConnectionError(
                f"the stream ended after {self.count} of {len(self.sequences)} answers",
                code="BACKEND_UNAVAILABLE",
                status_code=503,
            )
        return out

    def _line(self, line: bytes) -> list[tuple[int, Any]]:
        if not line.strip():
            return []
        out: list[tuple[int, Any]] = [self.held] if self.held is not None else []
        self.held = None
        self.count += 1
        try:
            message = load_json(line)
        except WireError as exc:
            raise _protocol_error(f"answer line {self.count}: {exc}") from None
        if self.count > len(self.sequences):
            raise _protocol_error(f"{self.count} answers to {len(self.sequences)} lines")
        if not isinstance(message, Mapping) or message.get("sequence") != self.count:
            got = message.get("sequence") if isinstance(message, Mapping) else None
            raise _protocol_error(f"answer line {self.count} says sequence {got!r}")
        sequence = self.sequences[self.count - 1]
        if "error" in message:
            self.held = (sequence, _line_error(message["error"]))
        else:
            out.append((sequence, _stream_result(message.get("result"))))
        return out


async def _take(
    batches: AsyncIterator[tuple[int, Mapping[str, Any]]], count: int
) -> list[tuple[int, Mapping[str, Any]]]:
    """Up to ``count`` batches of ``batches`` (``islice`` for an async iterator: no ``anext``
    past ``count``)."""
    taken: list[tuple[int, Mapping[str, Any]]] = []
    while len(taken) < count and (batch := await anext(batches, None)) is not None:
        taken.append(batch)
    return taken


def _ws_url(base_url: str) -> str:
    return base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws/status"


class HttpTransport:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base_url)

    def send(self, op: Operation, body: Mapping[str, Any] | None, call: CallOptions) -> Any:
        try:
            response = self.client.send(_build(self.client, op, body, call))
        except httpx.TransportError as exc:
            raise _connection_error(exc, self.base_url) from exc
        return _result(response)

    def ready(self, call: CallOptions) -> bool:
        try:
            return self.client.get("/readyz", timeout=call.timeout_s).status_code == 200
        except httpx.TransportError:
            return False

    def encode_stream(
        self,
        model: str,
        batches: Iterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> Iterator[tuple[int, Any]]:
        """(sequence, response or SIEError) per batch, in order, over one POST after another
        (module docstring); a failed stream raises its SIEError."""
        posts = _Posts(window)
        while True:
            if room := posts.room:
                posts.add(list(islice(batches, room)), room)
            post = posts.cut()
            if not post:
                return
            if isinstance(refused := post[0].line, SIEError):
                yield post[0].sequence, refused
                continue
            yield from self._post(model, post, window, call)

    def _post(
        self, model: str, post: list[_Line], window: int, call: CallOptions
    ) -> Iterator[tuple[int, Any]]:
        """One POST of ``post``'s lines; each answer as its line arrives."""
        answers = _Answers(post)
        try:
            with self.client.stream("POST", **_stream_args(model, post, window, call)) as response:
                if not response.is_success:
                    raise _error_of(response, response.read())
                for chunk in response.iter_bytes():
                    yield from answers.feed(chunk)
        except httpx.TransportError as exc:
            raise _connection_error(exc, self.base_url) from exc
        yield from answers.end()

    def watch_status(self, interval_ms: int, call: CallOptions) -> Iterator[dict[str, Any]]:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        try:
            with connect(_ws_url(self.base_url), additional_headers=_headers(call)) as ws:
                for message in ws:
                    yield json.loads(message)
        except (OSError, WebSocketException) as exc:
            raise _connection_error(exc, self.base_url) from exc

    def close(self) -> None:
        self.client.close()


class AsyncHttpTransport:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.base_url)

    async def send(self, op: Operation, body: Mapping[str, Any] | None, call: CallOptions) -> Any:
        try:
            response = await self.client.send(_build(self.client, op, body, call))
        except httpx.TransportError as exc:
            raise _connection_error(exc, self.base_url) from exc
        return _result(response)

    async def ready(self, call: CallOptions) -> bool:
        try:
            response = await self.client.get("/readyz", timeout=call.timeout_s)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def encode_stream(
        self,
        model: str,
        batches: AsyncIterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> AsyncIterator[tuple[int, Any]]:
        """``HttpTransport.encode_stream``, awaiting."""
        posts = _Posts(window)
        while True:
            if room := posts.room:
                posts.add(await _take(batches, room), room)
            post = posts.cut()
            if not post:
                return
            if isinstance(refused := post[0].line, SIEError):
                yield post[0].sequence, refused
                continue
            async with contextlib.aclosing(self._post(model, post, window, call)) as answers:
                async for outcome in answers:  # closed with this generator, as yield from does
                    yield outcome

    async def _post(
        self, model: str, post: list[_Line], window: int, call: CallOptions
    ) -> AsyncGenerator[tuple[int, Any], None]:
        answers = _Answers(post)
        try:
            async with self.client.stream(
                "POST", **_stream_args(model, post, window, call)
            ) as response:
                if not response.is_success:
                    raise _error_of(response, await response.aread())
                async for chunk in response.aiter_bytes():
                    for outcome in answers.feed(chunk):
                        yield outcome
        except httpx.TransportError as exc:
            raise _connection_error(exc, self.base_url) from exc
        for outcome in answers.end():
            yield outcome

    async def watch_status(
        self, interval_ms: int, call: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        try:
            async with connect(_ws_url(self.base_url), additional_headers=_headers(call)) as ws:
                async for message in ws:
                    yield json.loads(message)
        except (OSError, WebSocketException) as exc:
            raise _connection_error(exc, self.base_url) from exc

    async def close(self) -> None:
        await self.client.aclose()
