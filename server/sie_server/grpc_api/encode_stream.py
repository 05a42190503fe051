"""``EncodeService.EncodeStream``: bulk encode over one bidirectional stream.

Each message carries a client ``sequence`` and an ``EncodeRequest``; each is run by the same
``encode`` as the unary ``Encode`` (same validation, same ``registry.encode``), so streamed items
batch with unary traffic under the same admission and fairness rules.

* Window: at most ``window`` requests (the first message's, 0: ``DEFAULT_WINDOW``, capped at
  ``MAX_WINDOW``) are in flight per stream, from read until their response is written. While
  the window is full the reader stops reading, so gRPC flow control holds the client back and
  memory stays bounded whatever the stream's length.
* Order: responses are written in the order the requests arrived (sequence order for a client
  that counts up), whatever order they complete in.
* Errors: a request that fails answers a ``StreamError`` for its sequence (reason, message and
  metadata as the unary call's ``ErrorInfo``, retry hint from the error) and the stream goes on.
  The reasons that only say "not yet" (QUEUE_FULL; MODEL_LOADING, LORA_LOADING, MODEL_NOT_LOADED:
  the first request starts the load) are not answered: the request is retried after the error's
  hint, because a bulk client would only send it again, and waiting here keeps the window (and
  the client) back. The stream's deadline, or the client cancelling, ends the waiting.
* Cancellation: when the client cancels or the deadline passes, gRPC cancels this handler, which
  cancels the reader and every request still in flight (the executor frees their items).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from sie_sdk.v1 import encode_pb2

from sie_server.engine.registry import ModelRegistry
from sie_server.errors import InvalidInput, ModelNotLoaded, QueueFull, SIEServerError
from sie_server.grpc_api.errors import model_label
from sie_server.observability.metrics import REQUESTS_TOTAL

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 4
MAX_WINDOW = 64
#: The errors retried in the stream instead of answered (ModelNotLoaded covers its subclasses
#: ModelLoading and LoraLoading).
RETRIED = (QueueFull, ModelNotLoaded)
#: The wait before a retry when the error carries no hint.
DEFAULT_RETRY_S = 0.5
ENDPOINT = "encode_stream"

Encode = Callable[[encode_pb2.EncodeRequest], Awaitable[encode_pb2.EncodeResponse]]
Answer = asyncio.Task[encode_pb2.EncodeStreamResponse]


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    """Counts every streamed request once in ``sie_requests_total`` (endpoint ``encode_stream``),
    like ``translate_errors`` counts a unary call: status ``ok`` or the error's reason."""

    registry: ModelRegistry

    def record(self, request: encode_pb2.EncodeRequest, status: str) -> None:
        self.registry.metrics.inc(
            REQUESTS_TOTAL,
            model=model_label(self.registry, request),
            endpoint=ENDPOINT,
            status=status,
        )


def window_of(message: encode_pb2.EncodeStreamRequest) -> int:
    """The window the first message asks for, defaulted and capped."""
    return min(message.window or DEFAULT_WINDOW, MAX_WINDOW)


async def encode_stream(
    requests: AsyncIterator[encode_pb2.EncodeStreamRequest],
    encode: Encode,
    metrics: StreamMetrics,
) -> AsyncGenerator[encode_pb2.EncodeStreamResponse, None]:
    """Answer every request of ``requests``, in arrival order, at most a window at a time."""
    answers: asyncio.Queue[Answer | None] = asyncio.Queue()
    in_flight: set[Answer] = set()
    window = asyncio.Semaphore(0)  # opened by the reader once the first message names it
    reader = asyncio.create_task(_read(requests, encode, metrics, window, answers, in_flight))
    try:
        while (answer := await answers.get()) is not None:
            response = await answer
            in_flight.discard(answer)
            yield response
            window.release()
        await reader  # re-raises what ended the reading, if anything did
    finally:
        for task in (reader, *in_flight):
            task.cancel()
        await asyncio.gather(reader, *in_flight, return_exceptions=True)


async def _read(
    requests: AsyncIterator[encode_pb2.EncodeStreamRequest],
    encode: Encode,
    metrics: StreamMetrics,
    window: asyncio.Semaphore,
    answers: asyncio.Queue[Answer | None],
    in_flight: set[Answer],
) -> None:
    """Start one task per request, in order; take a slot of the window before each read."""
    try:
        message = await anext(requests, None)
        if message is not None:
            for _ in range(window_of(message) - 1):  # the first message holds the last slot
                window.release()
        while message is not None:
            task = asyncio.create_task(_answer(message, encode, metrics))
            in_flight.add(task)
            answers.put_nowait(task)
            await window.acquire()
            message = await anext(requests, None)
    finally:
        answers.put_nowait(None)


async def _answer(
    message: encode_pb2.EncodeStreamRequest, encode: Encode, metrics: StreamMetrics
) -> encode_pb2.EncodeStreamResponse:
    """The response for one message: its ``EncodeResponse``, or the error it failed with."""
    sequence = message.sequence
    request = message.request
    try:
        response = await _encode_retrying(message, encode)
    except SIEServerError as exc:
        error = exc
    except Exception as exc:
        log.exception("unexpected error in EncodeStream (sequence %d)", sequence)
        error = SIEServerError(f"internal error: {type(exc).__name__}")
    else:
        metrics.record(request, "ok")
        return encode_pb2.EncodeStreamResponse(sequence=sequence, response=response)
    metrics.record(request, error.reason)
    return encode_pb2.EncodeStreamResponse(sequence=sequence, error=stream_error(error))


async def _encode_retrying(
    message: encode_pb2.EncodeStreamRequest, encode: Encode
) -> encode_pb2.EncodeResponse:
    """``encode`` the message's request; a ``RETRIED`` error waits for its hint and tries
    again."""
    if not message.HasField("request"):
        raise InvalidInput(f"stream message {message.sequence}: it carries no request")
    while True:
        try:
            return await encode(message.request)
        except RETRIED as exc:
            await asyncio.sleep(exc.retry_after_s or DEFAULT_RETRY_S)


def stream_error(error: SIEServerError) -> encode_pb2.StreamError:
    """What the unary call's status would carry: reason, message, metadata, retry hint."""
    retry_ms = int(error.retry_after_s * 1000) if error.retry_after_s is not None else 0
    return encode_pb2.StreamError(
        reason=error.reason,
        message=error.message,
        metadata=error.metadata(),
        retry_after_ms=retry_ms,
    )
