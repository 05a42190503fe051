"""Closed-loop clients, the same for every system: only the call itself differs.

``concurrency`` workers each send a request, wait for its reply, and send the next, for a warm-up
and then a measuring window. A request counts when it FINISHES inside the window, whenever it was
sent (counting only requests both sent and finished inside it under-counts by about
concurrency / window). Calls in flight when the window closes are awaited (bounded) and dropped.
The window is ``window_s``, stretched (up to ``max_window_s``) until ``min_calls`` calls are
counted, so a slow or loaded machine still yields percentiles; the window actually used is
reported. Latency percentiles are over the counted calls. Every call's reply is checked by its caller (the
number of vectors), and a failed call is an error, never a completion.

Callers: gRPC (grpc.aio, one channel), our bridge (aiohttp, msgpack or JSON), infinity-emb
(OpenAI-shaped ``/embeddings``), the original SIE (``/v1/encode`` JSON).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from bench_common import CALL_TIMEOUT_S, MODEL, percentile
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_sdk.wire import pack_msgpack, unpack_msgpack

Call = Callable[[Sequence[str]], Awaitable[None]]


class BadReply(Exception):
    """A reply without one vector per text."""


@dataclass(slots=True)
class Window:
    """What one closed-loop cell measured."""

    completed: int = 0
    texts: int = 0
    tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    window_s: float = 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)


async def closed_loop(
    call: Call,
    requests: Sequence[Sequence[str]],
    request_tokens: Sequence[int],
    concurrency: int,
    warm_s: float,
    window_s: float,
    max_window_s: float | None = None,
    min_calls: int = 0,
) -> Window:
    """Run ``concurrency`` workers over ``requests`` (cycled) for ``warm_s + window_s``;
    ``request_tokens[i]`` is the number of tokens in ``requests[i]``."""
    out = Window()
    counter = iter(range(1 << 62))
    loop = asyncio.get_running_loop()
    start = loop.time() + warm_s
    longest = start + max(window_s, max_window_s or 0.0)
    closed_at: float | None = None

    def closed() -> bool:
        nonlocal closed_at
        if closed_at is None:
            now = loop.time()
            if now >= longest or (now >= start + window_s and out.completed >= min_calls):
                closed_at = now
        return closed_at is not None

    async def worker() -> None:
        while not closed():
            index = next(counter) % len(requests)
            texts = requests[index]
            sent = time.perf_counter()
            try:
                await call(texts)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, TimeoutError, BadReply) as exc:
                out.errors += 1
                if len(out.first_errors) < 3:
                    out.first_errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            done = loop.time()
            if start <= done and not closed():
                out.completed += 1
                out.texts += len(texts)
                out.tokens += request_tokens[index]
                out.latencies_ms.append((time.perf_counter() - sent) * 1000.0)

    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(concurrency))),
        timeout=warm_s + max(window_s, max_window_s or 0.0) + 2 * CALL_TIMEOUT_S,
    )
    assert closed_at is not None
    out.window_s = closed_at - start
    return out


def _check(count: int, texts: Sequence[str]) -> None:
    if count != len(texts):
        raise BadReply(f"{count} vectors for {len(texts)} texts")


class GrpcCaller:
    """Our server over gRPC: one channel shared by the workers."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = encode_pb2_grpc.EncodeServiceStub(self.channel)

    async def __call__(self, texts: Sequence[str]) -> None:
        request = encode_pb2.EncodeRequest(
            model=MODEL, items=[common_pb2.Item(text=t) for t in texts]
        )
        reply = await self.stub.Encode(request, timeout=CALL_TIMEOUT_S)
        _check(sum(1 for item in reply.items if item.dense.values.data), texts)

    async def close(self) -> None:
        await self.channel.close(None)


class HttpCaller:
    """Any HTTP system: ``flavour`` picks the body and how the reply is read."""

    def __init__(self, base_url: str, flavour: str, concurrency: int, model: str = MODEL) -> None:
        self.flavour = flavour
        self.model = model
        if flavour == "infinity":
            self.url = f"{base_url}/embeddings"
        else:
            self.url = f"{base_url}/v1/encode/{model}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency + 4),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
        )

    def _body(self, texts: Sequence[str]) -> tuple[bytes, dict[str, str]]:
        if self.flavour == "msgpack":
            kind = "application/msgpack"
            body = pack_msgpack({"items": [{"text": t} for t in texts]})
            return body, {"Content-Type": kind, "Accept": kind}
        payload: dict[str, Any]
        if self.flavour == "infinity":
            payload = {"model": self.model, "input": list(texts)}
        else:
            payload = {"items": [{"text": t} for t in texts]}
        kind = "application/json"
        return json.dumps(payload).encode(), {"Content-Type": kind, "Accept": kind}

    async def __call__(self, texts: Sequence[str]) -> None:
        body, headers = self._body(texts)
        async with self.session.post(self.url, data=body, headers=headers) as response:
            raw = await response.read()
            if response.status != 200:
                raise BadReply(f"HTTP {response.status}: {raw[:200]!r}")
        if self.flavour == "msgpack":
            reply: Any = unpack_msgpack(raw)
        else:
            reply = json.loads(raw)
        items = reply.get("data") if self.flavour == "infinity" else reply.get("items")
        _check(len(items) if isinstance(items, list) else -1, texts)

    async def close(self) -> None:
        await self.session.close()
