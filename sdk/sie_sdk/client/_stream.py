"""Bulk streaming encode (``encode_stream``), the part both clients share.

The input items are cut into batches of ``batch_size``; batch ``n`` (counting from 1) goes out
with ``sequence`` n: a message of the gRPC ``EncodeStream``, or a line of the bridge's NDJSON
``POST /v1/encode/:model/stream`` (the HTTP transport maps the bridge's per-POST line numbers back
to these). Each batch is built by ``ClientCore.encode``, the same request a unary ``encode``
sends, and its response parsed the same way. A batch stays *unacknowledged* until its response
arrives; at most ``max_unacked(window)`` are, so the client holds a bounded number of batches
whatever the input's length (the input is read lazily).

Resuming: when the stream fails with a reason the SDK retries (the server restarting is
BACKEND_UNAVAILABLE or SHUTTING_DOWN), the client waits as ``RetryPolicy`` says, opens a new
stream and sends the unacknowledged batches again, with their sequence numbers, before the rest.
Results come out in input order, each item once.

A batch the server answers with an error yields, for each of its items, the ``SIEError`` the
unary call would raise (not raised: the stream goes on); the caller checks ``isinstance``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sie_sdk.client._retry import RetryPolicy
from sie_sdk.client.errors import SIEError
from sie_sdk.types import EncodeResult, Item

#: A per-item result of ``encode_stream``: the result, or the error its batch failed with.
StreamResult = EncodeResult | SIEError
DEFAULT_BATCH_SIZE = 64
DEFAULT_WINDOW = 4


@dataclass(frozen=True, slots=True)
class Batch:
    """One stream message: its sequence, the request body, how to parse the response."""

    sequence: int
    body: Mapping[str, Any]
    parse: Callable[[list[Any]], Any]
    size: int


def max_unacked(window: int) -> int:
    """How many batches of a stream may be sent and unanswered at once: the server works on
    ``window`` while as many more wait to be read, so it never idles between answers."""
    return 2 * window


class StreamState:
    """The input, the unacknowledged batches and the next sequence number of one
    ``encode_stream`` call. ``lock`` guards them: the sync client's request iterator runs in a
    grpc thread while the caller's thread acknowledges."""

    def __init__(
        self,
        items: Iterable[Item] | AsyncIterable[Item],
        build: Callable[[list[Item]], tuple[Mapping[str, Any], Callable[[list[Any]], Any]]],
        batch_size: int,
        window: int,
        policy: Callable[[], RetryPolicy],
    ) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be at least 1")
        #: A fresh retry policy (after each acknowledged batch: the budget is per outage).
        self.policy = policy
        #: What reading or building the input raised (in the request iterator); re-raised to
        #: the caller by ``check``.
        self.input_error: Exception | None = None
        #: The input: a plain iterator, or (the asyncio client only) an async one.
        self._items: Iterator[Item] | None = None
        self._async_items: AsyncIterator[Item] | None = None
        if isinstance(items, AsyncIterable):
            self._async_items = aiter(items)
        else:
            self._items = iter(items)
        self._build = build
        self.batch_size = batch_size
        self.window = window
        self.max_unacked = max_unacked(window)
        self._unacked: deque[Batch] = deque()
        self._next_sequence = 1
        self._next_index = 0
        self._exhausted = False
        self.lock = threading.Lock()

    @property
    def done(self) -> bool:
        """Every item was read and every batch acknowledged."""
        with self.lock:
            return self._exhausted and not self._unacked

    @property
    def full(self) -> bool:
        with self.lock:
            return len(self._unacked) >= self.max_unacked

    def unacked(self) -> list[Batch]:
        """The batches sent and not answered: a new stream sends them first."""
        with self.lock:
            return list(self._unacked)

    def take(self) -> Batch | None:
        """The next batch of the input (now unacknowledged), or None when the input is done.
        Items without an id get ``item-<position in the input>``."""
        if self._items is None:
            raise TypeError(
                "encode_stream: an async iterable of items needs SIEAsyncClient.encode_stream"
            )
        with self.lock:
            return self._batch(list(islice(self._items, self.batch_size)))

    async def take_async(self) -> Batch | None:
        """``take`` for the asyncio client: an async input is awaited a ``batch_size`` at a
        time (nothing is held meanwhile), a plain one read as ``take`` reads it."""
        if self._async_items is None:
            return self.take()
        chunk: list[Item] = []
        while len(chunk) < self.batch_size:
            try:
                chunk.append(await anext(self._async_items))
            except StopAsyncIteration:
                break
        with self.lock:
            return self._batch(chunk)

    def _batch(self, chunk: list[Item]) -> Batch | None:
        """``chunk`` as the next unacknowledged batch (the lock held); None when it is empty:
        the input is done."""
        if not chunk:
            self._exhausted = True
            return None
        start = self._next_index
        self._next_index += len(chunk)
        named = [
            item if not isinstance(item, Mapping) or "id" in item else {**item, "id": f"item-{i}"}
            for i, item in enumerate(chunk, start=start)
        ]
        body, parse = self._build(named)  # type: ignore[arg-type]
        batch = Batch(self._next_sequence, body, parse, len(chunk))
        self._next_sequence += 1
        self._unacked.append(batch)
        return batch

    def take_or_stop(self) -> Batch | None:
        """``take``, except that an input error stops the stream (kept for ``check``): raised
        in grpc's request iterator it would only cancel the call."""
        try:
            return self.take()
        except Exception as exc:
            self.input_error = exc
            return None

    async def take_or_stop_async(self) -> Batch | None:
        """``take_or_stop`` with ``take_async``."""
        try:
            return await self.take_async()
        except Exception as exc:
            self.input_error = exc
            return None

    def check(self) -> None:
        """Raise the input's error, if reading it failed."""
        if self.input_error is not None:
            raise self.input_error

    def ack(self, sequence: int, outcome: Any) -> list[StreamResult]:
        """The per-item results of the oldest unacknowledged batch, which ``sequence`` must be
        (the server answers in order); ``outcome``: the response, or the batch's SIEError."""
        with self.lock:
            if not self._unacked or self._unacked[0].sequence != sequence:
                expected = self._unacked[0].sequence if self._unacked else None
                raise SIEError(
                    f"encode_stream: the server answered sequence {sequence}, expected {expected}",
                    code="STREAM_PROTOCOL",
                )
            batch = self._unacked.popleft()
        if isinstance(outcome, SIEError):
            return [outcome] * batch.size
        results: list[StreamResult] = list(batch.parse([outcome]))
        return results


def sync_requests(
    state: StreamState, room: threading.Condition, stop: threading.Event
) -> Iterator[Batch]:
    """The batches one (sync) stream sends: the unacknowledged ones, then new ones while fewer
    than ``max_unacked`` are unanswered; ends when the input does or ``stop`` is set."""
    yield from state.unacked()
    while True:
        with room:  # a stopped stream's iterator takes nothing more (its grpc thread may lag)
            while state.full and not stop.is_set():
                room.wait(0.1)
            batch = None if stop.is_set() else state.take_or_stop()
        if batch is None:
            return
        yield batch


async def async_requests(
    state: StreamState, room: asyncio.Condition, stop: asyncio.Event
) -> AsyncIterator[Batch]:
    """``sync_requests`` for the asyncio client (the input is read on the event loop)."""
    for resent in state.unacked():
        yield resent
    while True:
        async with room:
            await room.wait_for(lambda: not state.full or stop.is_set())
        # The input is read with the condition released: a slow async input never holds back
        # the acknowledgements (this generator is the only reader, so the room stays).
        batch = None if stop.is_set() else await state.take_or_stop_async()
        if batch is None:
            return
        yield batch
