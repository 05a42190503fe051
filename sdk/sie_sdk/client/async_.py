"""``SIEAsyncClient``: the asyncio client, with the same methods as coroutines. Everything but the
waiting lives in ``_core``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
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
    async_requests,
)
from sie_sdk.client._transports.base import AsyncTransport, Operation
from sie_sdk.client.errors import ProvisioningError, SIEError
from sie_sdk.types import CapacityInfo, EncodeResult, ExtractResult, Item, ModelInfo, ScoreResult

R = TypeVar("R")


async def _off_loop(build: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Build the request, in a worker thread when items carry images or documents (reading
    files and encoding JPEGs must not block the event loop)."""
    if any(_has_files(arg) for arg in args):
        return await asyncio.to_thread(build, *args, **kwargs)
    return build(*args, **kwargs)


def _has_files(value: Any) -> bool:
    items = [value] if isinstance(value, Mapping) else value if isinstance(value, list) else []
    return any(isinstance(i, Mapping) and ("images" in i or "document" in i) for i in items)


def _transport(config: ClientConfig) -> AsyncTransport:
    if config.transport == "http":
        from sie_sdk.client._transports.http import AsyncHttpTransport

        return AsyncHttpTransport(config.base_url)
    from sie_sdk.client._transports.grpc import AsyncGrpcTransport

    return AsyncGrpcTransport(config.base_url)


class SIEAsyncClient(ClientBase[AsyncTransport]):
    """Asyncio client for an SIE server, over HTTP (the bridge) or gRPC."""

    def _open(self, config: ClientConfig) -> AsyncTransport:
        return _transport(config)

    # ---- IO ------------------------------------------------------------------------------------
    async def _send(
        self, op: Operation, body: dict[str, Any] | None, prepared: Prepared[Any]
    ) -> Any:
        if self._closed:
            raise closed_error()
        policy = RetryPolicy(prepared.provision_timeout_s, prepared.wait_for_capacity)
        while True:
            held = self._throttle.before(op.model)
            try:
                if held is not None:
                    raise held
                result = await self._transport.send(op, body, self._call)
            except SIEError as error:
                if error is not held:
                    self._throttle.after(op.model, error)
                delay = policy.delay_after(error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            else:
                self._throttle.after(op.model, None)
                return result

    async def _run(self, prepared: Prepared[R]) -> R:
        gate = asyncio.Semaphore(self.config.max_concurrency)

        async def one(body: dict[str, Any] | None) -> list[Any]:
            """The responses to ``body``: one, or one per smaller request, in order, where
            the server refused it for its size (``smaller_bodies``)."""
            async with gate:
                try:
                    return [await self._send(prepared.op, body, prepared)]
                except SIEError as error:
                    pieces = smaller_bodies(prepared, body, error)
                    if pieces is None:
                        raise
            # The gate is released: the pieces take their own turns.
            parts = await asyncio.gather(*(one(piece) for piece in pieces))
            return [response for part in parts for response in part]

        parts = await asyncio.gather(*(one(b) for b in prepared.bodies))
        return prepared.parse([response for part in parts for response in part])

    # ---- the reference's methods -----------------------------------------------------------------
    async def encode(
        self, model: str, items: Item | Sequence[Item], **kwargs: Any
    ) -> EncodeResult | list[EncodeResult]:
        return await self._run(await _off_loop(self._core.encode, model, items, **kwargs))

    def encode_stream(
        self,
        model: str,
        items: Iterable[Item] | AsyncIterable[Item],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        window: int = DEFAULT_WINDOW,
        **kwargs: Any,
    ) -> AsyncIterator[StreamResult]:
        """``SIEClient.encode_stream`` as an async iterator. ``items`` is an async iterable
        (awaited a batch at a time) or a plain one (read on the event loop)."""
        state = self._core.encode_stream(model, items, batch_size, window, **kwargs)
        return self._stream(model, state)

    async def _stream(self, model: str, state: StreamState) -> AsyncIterator[StreamResult]:
        policy = state.policy()
        while not state.done:
            if self._closed:
                raise closed_error()
            room, stop = asyncio.Condition(), asyncio.Event()
            batches = ((b.sequence, b.body) async for b in async_requests(state, room, stop))
            replies = self._transport.encode_stream(model, batches, state.window, self._call)
            try:
                async for sequence, outcome in replies:
                    results = state.ack(sequence, outcome)
                    async with room:
                        room.notify_all()
                    policy = state.policy()
                    for result in results:
                        yield result
            except SIEError as error:
                state.check()
                delay = policy.delay_after(error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            finally:
                stop.set()
                async with room:
                    room.notify_all()
                await replies.aclose()  # type: ignore[attr-defined]
            state.check()

    async def score(
        self, model: str, query: Item, items: Sequence[Item], **kwargs: Any
    ) -> ScoreResult:
        return await self._run(await _off_loop(self._core.score, model, query, items, **kwargs))

    async def extract(
        self, model: str, items: Item | Sequence[Item], **kwargs: Any
    ) -> ExtractResult | list[ExtractResult]:
        return await self._run(await _off_loop(self._core.extract, model, items, **kwargs))

    async def list_models(self) -> list[ModelInfo]:
        return await self._run(self._core.list_models())

    async def get_model(self, model: str) -> ModelInfo:
        return await self._run(self._core.get_model(model))

    def watch_status(self, interval_ms: int = 200) -> AsyncIterator[dict[str, Any]]:
        """The server's status messages (the ``/ws/status`` schema), until the caller stops."""
        return self._transport.watch_status(interval_ms, self._call)

    async def get_capacity(self, *, gpu: str | None = None) -> CapacityInfo:
        self._core._route(gpu)
        ready = await self._transport.ready(self._call)
        status = None
        if ready:
            stream = self.watch_status()
            try:
                status = await anext(stream, None)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        return self._core.capacity(ready, status)

    async def wait_for_capacity(
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
        while not await self._transport.ready(self._call):
            if time.monotonic() >= deadline:
                raise ProvisioningError(f"the server was not ready within {budget:.0f}s", gpu=gpu)
            await asyncio.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))
        if model is not None:
            remaining = max(0.0, deadline - time.monotonic())
            await self.encode(model, {"text": "warm up"}, provision_timeout_s=remaining)
        return await self.get_capacity()

    async def create_pool(self, name: str, gpus: Mapping[str, int], **kwargs: Any) -> None:
        raise no_pools(name)

    async def get_pool(self, name: str) -> dict[str, Any]:
        raise no_pools(name)

    async def delete_pool(self, name: str) -> None:
        raise no_pools(name)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def close(self) -> None:
        self._closed = True
        await self._transport.close()

    async def __aenter__(self) -> SIEAsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
