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
from importlib.resources import files
from typing import Any

import grpc
from aiohttp import WSMsgType, web
from sie_sdk.v1 import status_pb2
from sie_sdk.wire import dump_json

from sie_bridge.state import SETTINGS, UPSTREAM

log = logging.getLogger(__name__)
RECONNECT_S = 1.0


def _config(config: status_pb2.ModelConfig) -> dict[str, Any]:
    return {
        "adapter": config.adapter,
        "max_sequence_length": config.max_sequence_length,
        "outputs": list(config.outputs),
        "default_profile": config.default_profile,
        "tasks": list(config.tasks),
    }


def status_json(snapshot: status_pb2.WatchStatusResponse) -> dict[str, Any]:
    """The spec's ``/ws/status`` message. ``counters`` and ``histograms`` are keyed by metric name,
    then by model (summed over other labels), as the original SIE server sends them."""
    counters: dict[str, dict[str, int]] = {}
    for sample in snapshot.counters:
        by_model = counters.setdefault(sample.name, {})
        model = sample.labels.get("model", "")
        by_model[model] = by_model.get(model, 0) + sample.value
    histograms: dict[str, dict[str, dict[str, Any]]] = {}
    for h in snapshot.histograms:
        entry = histograms.setdefault(h.name, {}).setdefault(
            h.labels.get("model", ""),
            {"buckets": list(h.bounds), "counts": [0] * len(h.counts), "sum": 0.0, "count": 0},
        )
        if len(entry["counts"]) == len(h.counts):
            entry["counts"] = [a + b for a, b in zip(entry["counts"], h.counts, strict=True)]
            entry["sum"] += h.sum
            entry["count"] += h.count
    server = snapshot.server
    return {
        "timestamp": snapshot.timestamp,
        "gpu": snapshot.gpu,
        "loaded_models": list(snapshot.loaded_models),
        "server": {
            "version": server.version,
            "uptime_seconds": server.uptime_seconds,
            "user": server.user,
            "working_dir": server.working_dir,
            "pid": server.pid,
        },
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "gpu_type": g.gpu_type,
                "utilization_percent": g.utilization_percent,
                "memory_used_bytes": g.memory_used_bytes,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_threshold_pct": g.memory_threshold_pct,
                "temperature_c": g.temperature_c,
            }
            for g in snapshot.gpus
        ],
        "models": [
            {
                "name": m.name,
                "state": m.state,
                "device": m.device or None,
                "memory_bytes": m.memory_bytes,
                "queue_depth": m.queue_depth,
                "queue_pending_items": m.queue_pending_items,
                "config": _config(m.config),
            }
            for m in snapshot.models
        ],
        "counters": counters,
        "histograms": histograms,
    }


async def _relay(request: web.Request, ws: web.WebSocketResponse) -> None:
    upstream = request.app[UPSTREAM]
    interval_ms = request.app[SETTINGS].status_interval_ms
    while not ws.closed:
        stream = upstream.watch_status(interval_ms)
        try:
            async for snapshot in stream:
                await ws.send_str(dump_json(status_json(snapshot)).decode())
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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws/status", ws_status)
    app.router.add_get("/", page)
