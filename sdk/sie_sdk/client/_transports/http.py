"""The HTTP transport: through the bridge, msgpack both ways (``sie_sdk.wire``), with httpx.

Requests carry ``Content-Type``/``Accept: application/msgpack``, ``X-SIE-SDK-Version`` and, with an
API key, ``Authorization: Bearer``. A 2xx body decodes into the HTTP API's shape with vectors as
numpy views; any other status is read as ``{"detail": {"code", "message", ...}}`` (JSON or
msgpack, by ``Content-Type``) plus ``Retry-After`` and raised through the reason table, exactly as
the gRPC transport raises the same reason. Connection failures become ``SIEConnectionError``.
The status stream is the bridge's ``/ws/status`` (``websockets``). ``HttpTransport`` and
``AsyncHttpTransport`` share everything but the waiting.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from sie_sdk import __version__
from sie_sdk.client._stream import http_unsupported
from sie_sdk.client._transports.base import CallOptions, Operation
from sie_sdk.client.errors import (
    RequestError,
    ServerError,
    SIEConnectionError,
    SIEError,
    error_from_detail,
)
from sie_sdk.reasons import REASONS, ErrorDetail
from sie_sdk.wire import MSGPACK, WireError, is_msgpack, load_json, pack_msgpack, unpack_msgpack

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
    content_type = response.headers.get("Content-Type")
    if response.is_success:
        return _decode(response.content, content_type)
    raise _error(response.status_code, response.content, content_type, response.headers)


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
        raise http_unsupported()

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

    def encode_stream(
        self,
        model: str,
        batches: AsyncIterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> AsyncIterator[tuple[int, Any]]:
        raise http_unsupported()

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
