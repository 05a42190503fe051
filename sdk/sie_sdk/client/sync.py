"""``SIEClient``: the blocking client. Everything but the waiting lives in ``_core``."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from sie_sdk.client._core import (
    ClientBase,
    ClientConfig,
    Prepared,
    closed_error,
    no_pools,
    smaller_bodies,
)
from sie_sdk.client._retry import RetryPolicy
from sie_sdk.client._stream import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_WINDOW,
    StreamResult,
    StreamState,
    sync_requests,
)
from sie_sdk.client._transports.base import Operation, Transport
from sie_sdk.client.errors import ProvisioningError, SIEError
from sie_sdk.types import CapacityInfo, EncodeResult, ExtractResult, Item, ModelInfo, ScoreResult

R = TypeVar("R")


def _transport(config: ClientConfig) -> Transport:
    if config.transport == "http":
        from sie_sdk.client._transports.http import HttpTransport

        return HttpTransport(config.base_url)
    from sie_sdk.client._transports.grpc import GrpcTransport

    return GrpcTransport(config.base_url)


class SIEClient(ClientBase[Transport]):
    """Synchronous client for an SIE server, over HTTP (the bridge) or gRPC."""

    def _open(self, config: ClientConfig) -> Transport:
        return _transport(config)

    # ---- IO ------------------------------------------------------------------------------------
    def _send(self, op: Operation, body: dict[str, Any] | None, prepared: Prepared[Any]) -> Any:
        if self._closed:
            raise closed_error()
        policy = RetryPolicy(prepared.provision_timeout_s, prepared.wait_for_capacity)
        while True:
            held = self._throttle.before(op.model)
            try:
                if held is not None:
                    raise held
                result = self._transport.send(op, body, self._call)
            except SIEError as error:
                if error is not held:
                    self._throttle.after(op.model, error)
                delay = policy.delay_after(error)
                if delay is None:
                    raise
                time.sleep(delay)
            else:
                self._throttle.after(op.model, None)
                return result

    def _run(self, prepared: Prepared[R]) -> R:
        def one(body: dict[str, Any] | None) -> list[Any]:
            """The responses to ``body``: one, or one per smaller request, in order, where
            the server refused it for its size (``smaller_bodies``)."""
            try:
                return [self._send(prepared.op, body, prepared)]
            except SIEError as error:
                pieces = smaller_bodies(prepared, body, error)
                if pieces is None:
                    raise
            return [response for piece in pieces for response in one(piece)]

        if len(prepared.bodies) == 1:
            return prepared.parse(one(prepared.bodies[0]))
        workers = min(self.config.max_concurrency, len(prepared.bodies))
        with ThreadPoolExecutor(workers, thread_name_prefix="sie-sdk") as pool:
            return prepared.parse([r for part in pool.map(one, prepared.bodies) for r in part])

    # ---- the reference's methods -----------------------------------------------------------------
    def encode(
        self, model: str, items: Item | Sequence[Item], **kwargs: Any
    ) -> EncodeResult | list[EncodeResult]:
        return self._run(self._core.encode(model, items, **kwargs))

    def encode_stream(
        self,
        model: str,
        items: Iterable[Item],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        window: int = DEFAULT_WINDOW,
        **kwargs: Any,
    ) -> Iterator[StreamResult]:
        """Encode a stream of items: one result per item, in input order. Over gRPC one
        ``EncodeStream``; over HTTP the bridge's NDJSON ``/v1/encode/:model/stream``, one POST of
        at most ``2 * window`` batches after another.

        ``items`` is read lazily, ``batch_size`` at a time (one request each, ``encode``'s
        ``kwargs``); ``window``: requests the server works on at once. A request the server
        refuses yields its ``SIEError`` for each of its items and the stream goes on; a server
        restart is waited for (``provision_timeout_s``) and the stream resumed from the last
        acknowledged batch. See ``sie_sdk.client._stream``."""
        if isinstance(items, AsyncIterable):
            raise TypeError("an async iterable of items needs SIEAsyncClient.encode_stream")
        state = self._core.encode_stream(model, items, batch_size, window, **kwargs)
        return self._stream(model, state)

    def _stream(self, model: str, state: StreamState) -> Iterator[StreamResult]:
        policy = state.policy()
        while not state.done:
            if self._closed:
                raise closed_error()
            room, stop = threading.Condition(), threading.Event()
            batches = ((b.sequence, b.body) for b in sync_requests(state, room, stop))
            replies = self._transport.encode_stream(model, batches, state.window, self._call)
            try:
                for sequence, outcome in replies:
                    results = state.ack(sequence, outcome)
                    with room:
                        room.notify_all()
                    policy = state.policy()
                    yield from results
            except SIEError as error:
                state.check()
                delay = policy.delay_after(error)
                if delay is None:
                    raise
                time.sleep(delay)
            finally:
                with room:
                    stop.set()
                    room.notify_all()
                replies.close()  # type: ignore[attr-defined]
            state.check()

    def score(self, model: str, query: Item, items: Sequence[Item], **kwargs: Any) -> ScoreResult:
        return self._run(self._core.score(model, query, items, **kwargs))

    def extract(
        self, model: str, items: Item | Sequence[Item], **kwargs: Any
    ) -> ExtractResult | list[ExtractResult]:
        return self._run(self._core.extract(model, items, **kwargs))

    def list_models(self) -> list[ModelInfo]:
        return self._run(self._core.list_models())

    def get_model(self, model: str) -> ModelInfo:
        return self._run(self._core.get_model(model))

    def watch_status(self, interval_ms: int = 200) -> Iterator[dict[str, Any]]:
        """The server's status messages (the ``/ws/status`` schema), until the caller stops."""
        return self._transport.watch_status(interval_ms, self._call)

    def get_capacity(self, *, gpu: str | None = None) -> CapacityInfo:
        self._core._route(gpu)
        ready = self._transport.ready(self._call)
        status = None
        if ready:
            stream = self.watch_status()
            try:
                status = next(stream, None)
            finally:
                stream.close()  # type: ignore[attr-defined]
        return self._core.capacity(ready, status)

    def wait_for_capacity(
        self,
        gpu: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float | None = None,
        poll_interval_s: float = 5.0,
    ) -> CapacityInfo:
        """Wait until the server is ready (and, with ``model``, until it encodes)."""
        self._core._route(gpu)
        budget = 300.0 if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        while not self._transport.ready(self._call):
            if time.monotonic() >= deadline:
                raise ProvisioningError(f"the server was not ready within {budget:.0f}s", gpu=gpu)
            time.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))
        if model is not None:
            remaining = max(0.0, deadline - time.monotonic())
            self.encode(model, {"text": "warm up"}, provision_timeout_s=remaining)
        return self.get_capacity()

    def create_pool(self, name: str, gpus: Mapping[str, int], **kwargs: Any) -> None:
        raise no_pools(name)

    def get_pool(self, name: str) -> dict[str, Any]:
        raise no_pools(name)

    def delete_pool(self, name: str) -> None:
        raise no_pools(name)

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        self._transport.close()

    def __enter__(self) -> SIEClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
