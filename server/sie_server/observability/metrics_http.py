"""The optional Prometheus port: ``GET /metrics`` on a tiny asyncio HTTP/1.1 server.

The server has no HTTP framework; this serves one resource and nothing else:

* ``GET /metrics`` (any query string ignored) answers 200 with the text ``render()`` returns,
  as ``text/plain; version=0.0.4``; ``HEAD`` answers the same headers without a body.
* Another path answers 404, another method 405, a malformed or oversized request 400, a
  failed render 500 (logged with its traceback).
* One request per connection (``Connection: close``); a client that does not finish its request
  head within ``READ_TIMEOUT_S`` is dropped.
* ``close()`` stops listening and cancels connections still open, so the port never outlives
  the server. Rendering runs on the event loop (the snapshot is cheap to build and render).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sie_sdk.prometheus import CONTENT_TYPE

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0
MAX_HEADER_LINES = 100
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


class MetricsHTTPServer:
    """Serves ``render()`` at ``/metrics`` until ``close``."""

    render: Callable[[], Awaitable[str]]
    port: int
    _server: asyncio.Server | None
    _connections: set[asyncio.Task[None]]

    def __init__(self, render: Callable[[], Awaitable[str]]) -> None:
        self.render = render
        self.port = 0
        self._server = None
        self._connections = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the bound port."""
        try:
            self._server = await asyncio.start_server(self._handle, host.strip("[]"), port)
        except OSError as exc:
            raise SystemExit(f"could not bind the metrics port {host}:{port}: {exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            status, body, head_only = await self._respond(reader)
            writer.write(_response(status, body, head_only))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        try:
            head = await asyncio.wait_for(_read_head(reader), READ_TIMEOUT_S)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError):
            return 400, b"bad request\n", False
        if head is None:
            return 400, b"bad request\n", False
        method, path = head
        if path.split("?", 1)[0] != "/metrics":
            return 404, b"not found\n", method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", False
        try:
            text = await self.render()
        except Exception:
            log.exception("rendering /metrics failed")
            return 500, b"internal error\n", False
        return 200, text.encode(), method == "HEAD"


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """(method, target) of the request line, after reading every header line; None if bad."""
    parts = (await reader.readline()).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return parts[0].upper(), parts[1]
        if not line:
            return None
    return None


def _response(status: int, body: bytes, head_only: bool) -> bytes:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{allow}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + body
