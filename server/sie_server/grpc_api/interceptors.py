"""Server interceptors: what must hold for every method, before any servicer runs.

``RejectMalformed``: a request whose bytes do not parse as its message (corrupt wire format,
truncated, wrong field types) is answered INVALID_ARGUMENT with our ``ErrorInfo``
(``INVALID_INPUT``), like every other bad input; in a request stream, such a message ends the
stream that way, once the requests read before it are answered (none of their work is lost;
a client stream, which has one answer for all of it, is refused whole) and the client has
stopped writing (``_drain``, bounded by ``--stream-drain-idle-s`` and ``--stream-drain-limit-s``).
Without it grpc's own deserializer raises before the servicer and the caller gets UNKNOWN.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from sie_server.errors import InvalidInput
from sie_server.grpc_api.errors import end_call

Context = grpc.aio.ServicerContext[Any, Any]
#: grpc's stubs type method handlers for the blocking server; the aio ones hold coroutines.
Handler = Any


@dataclass(frozen=True, slots=True)
class StreamDrain:
    """After a malformed message in a request stream: how long a quiet client is waited for
    (``idle_s``), and how long the rest of its messages are read at most (``limit_s``; 0: not at
    all), before the stream ends (``_drain``)."""

    idle_s: float
    limit_s: float


@dataclass(frozen=True, slots=True)
class _Malformed:
    message: str


async def _drain(requests: AsyncIterator[Any], bounds: StreamDrain) -> None:
    """Read and drop a stream's messages until the client half-closes, goes quiet for
    ``bounds.idle_s`` (a windowed client waiting for answers that will not come) or
    ``bounds.limit_s`` have passed. A grpc Python aio client still writing when the status
    arrives reports INTERNAL instead of it (grpc/grpc#36066), so the status waits for this."""
    loop = asyncio.get_running_loop()
    end = loop.time() + bounds.limit_s
    messages = aiter(requests)
    while (left := end - loop.time()) > 0:
        try:
            await asyncio.wait_for(anext(messages), min(bounds.idle_s, left))
        except (StopAsyncIteration, TimeoutError):
            return


class _Checked:
    """A request stream as its servicer sees it: it ends before the first malformed message,
    which is kept in ``malformed``, numbered, with ``outcome`` (what became of the others)."""

    def __init__(self, requests: AsyncIterator[Any], outcome: str) -> None:
        # Not ``aiter(requests)`` yet: grpc makes its receiving generator on the first
        # ``aiter``, and one a servicer never reads warns "never awaited" when collected.
        self._requests = requests
        self._messages: AsyncIterator[Any] | None = None
        self._outcome = outcome
        self._read = 0
        self.malformed: _Malformed | None = None

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        if self.malformed is not None:
            raise StopAsyncIteration
        if self._messages is None:
            self._messages = aiter(self._requests)
        request = await anext(self._messages)
        self._read += 1
        if isinstance(request, _Malformed):
            self.malformed = _Malformed(
                f"{request.message} (message {self._read} of the stream; {self._outcome})"
            )
            raise StopAsyncIteration
        return request


def _refuse(context: Context, malformed: _Malformed) -> None:
    """End the call (its handler then returns)."""
    end_call(context, InvalidInput(malformed.message))


class RejectMalformed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, drain: StreamDrain) -> None:
        self._drain = drain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # DecodeError and whatever a parser may raise
                return _Malformed(f"{method}: the request is not a valid message: {exc}")

        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_behavior(request: Any, context: Context) -> Any:
                if isinstance(request, _Malformed):
                    return _refuse(context, request)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_behavior,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    _refuse(context, request)
                    return
                async for message in stream(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            gather: Any = handler.stream_unary

            async def gather_behavior(requests: AsyncIterator[Any], context: Context) -> Any:
                # One answer for the whole stream: a malformed message fails all of it. The
                # servicer sees the stream end there, its answer is dropped, and the status
                # waits for the client to stop writing, as in a bidirectional stream.
                checked = _Checked(requests, "the call is refused, no message of it answered")
                response = await gather(checked, context)
                if checked.malformed is None:
                    return response
                await _drain(requests, self._drain)
                return _refuse(context, checked.malformed)

            return grpc.stream_unary_rpc_method_handler(
                gather_behavior,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            bidi: Any = handler.stream_stream

            async def bidi_behavior(
                requests: AsyncIterator[Any], context: Context
            ) -> AsyncIterator[Any]:
                # A message that does not parse has no sequence to answer. To the servicer it is
                # the end of the requests, so every request read before it is answered. Then
                # ``_drain`` reads what the client still sends, and the stream ends with
                # INVALID_ARGUMENT.
                checked = _Checked(
                    requests, "the ones before it were answered, the ones after it not run"
                )
                async for message in bidi(checked, context):
                    yield message
                if checked.malformed is not None:
                    await _drain(requests, self._drain)
                    _refuse(context, checked.malformed)

            return grpc.stream_stream_rpc_method_handler(
                bidi_behavior,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler
