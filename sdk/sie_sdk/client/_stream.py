"""Bulk streaming encode (``encode_stream``), the part both clients share.

The input items are cut into batches of ``batch_size``; batch ``n`` (counting from 1) goes out as
the stream message with ``sequence`` n. Each batch is built by ``ClientCore.encode``, the same
request a unary ``encode`` sends, and its response parsed the same way. A batch stays
*unacknowledged* until its response arrives; at most ``2 * window`` are, so the client holds a
bounded number of batches whatever the input's length (the input is read lazily).

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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
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


def http_unsupported() -> SIEError:
    return SIEError(
        "encode_stream needs the gRPC transport: the HTTP bridge has no streaming endpoint yet "
        "(connect with a grpc:// URL or a bare host:port)",
        code="STREAM_UNSUPPORTED",
    )


class StreamState:
    """The input, the unacknowledged batches and the next sequence number of one
    ``encode_stream`` call. ``lock`` guards them: the sync client's request iterator runs in a
    grpc thread while the caller's thread acknowledges."""

    def __init__(
        self,
        items: Iterable[Item],
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
        self._items = iter(items)
        self._build = build
        self.batch_size = batch_size
        self.window = window
        self.max_unacked = 2 * window
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
        with self.lock:
            chunk = list(islice(self._items, self.batch_size))
            if not chunk:
                self._exhausted = True
                return None
            start = self._next_index
            self._next_index += len(chunk)
            named = [
                item
                if not isinstance(item, Mapping) or "id" in item
                else {**item, "id": f"item-{i}"}
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
            batch = None if stop.is_set() else state.take_or_stop()
        if batch is None:
            return
        yield batch
