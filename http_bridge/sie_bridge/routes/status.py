"""``WS /ws/status`` (the server's status stream relayed as JSON) and ``GET /`` (the status page).

Each WebSocket client gets its own upstream ``WatchStatus`` stream at the configured interval
(200 ms by default) and one JSON text message per snapshot, in the spec's schema. When the stream
ends (the server drains or goes away) the relay reconnects with a short backoff and keeps the
socket open; while the backend is unreachable it sends ``{"backend": "unavailable", ...}`` once a
second so a page can say so. The relay stops when the client closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from importlib.resources import files

import grpc
from aiohttp import WSCloseCode, WSMsgType, web
from sie_sdk.convert.from_proto import status_message
from sie_sdk.wire import dump_json

from sie_bridge.state import SETTINGS, UPSTREAM

log = logging.getLogger(__name__)
RECONNECT_S = 1.0
STATUS_SOCKETS = web.AppKey("status_sockets", weakref.WeakSet[web.WebSocketResponse])


async def _relay(request: web.Request, ws: web.WebSocketResponse) -> None:
    upstream = request.app[UPSTREAM]
    interval_ms = request.app[SETTINGS].status_interval_ms
    while not ws.closed:
        stream = upstream.watch_status(interval_ms)
        try:
            async for snapshot in stream:
                await ws.send_str(dump_json(status_message(snapshot)).decode())
        except grpc.aio.AioRpcError as exc:
            log.debug("status stream ended: %s", exc.code().name)
        except ConnectionResetError:
            return
        finally:
            stream.cancel()
        if ws.closed:
            return
        await ws.send_str(dump_json({"backend": "unavailable", "timestamp": time.time()}).decode())
        await asyncio.sleep(RECONNECT_S)


async def ws_status(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    request.app[STATUS_SOCKETS].add(ws)
    relay = asyncio.create_task(_relay(request, ws))
    try:
        async for message in ws:  # the client only closes; anything it sends is ignored
            if message.type == WSMsgType.ERROR:
                break
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await relay
    return ws


async def page(request: web.Request) -> web.Response:
    html = files("sie_bridge").joinpath("static/index.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html")


async def _close_sockets(app: web.Application) -> None:
    """On shutdown, close every status socket (the page reconnects by itself); an open socket
    would otherwise hold the bridge's stop for aiohttp's whole shutdown timeout."""
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[STATUS_SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"bridge shutting down")


def add_routes(app: web.Application) -> None:
    app[STATUS_SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/ws/status", ws_status)
    app.router.add_get("/", page)
