"""``GET /healthz`` (the process is alive), ``GET /readyz`` (the backend's gRPC health) and
``GET /metrics`` (the server's metrics, read from one status snapshot, plus the bridge's own)."""

from __future__ import annotations

import grpc
from aiohttp import web
from sie_sdk.prometheus import CONTENT_TYPE, render
from sie_sdk.v1 import status_pb2

from sie_bridge.state import METRICS, UPSTREAM
from sie_bridge.upstream import Upstream

SNAPSHOT_TIMEOUT_S = 5.0
BRIDGE_HELP = {
    "sie_bridge_requests_total": "HTTP requests served by the bridge, by route, method and status",
    "sie_bridge_request_duration_seconds": "HTTP request latency at the bridge, by route",
}


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    ready, why = await request.app[UPSTREAM].ready()
    if ready:
        return web.Response(text="ok")
    return web.Response(status=503, text=f"not ready: {why}")


async def _snapshot(upstream: Upstream) -> status_pb2.WatchStatusResponse | None:
    """One status message from the server, or None when it cannot be reached."""
    stream = upstream.status.WatchStatus(
        status_pb2.WatchStatusRequest(), timeout=SNAPSHOT_TIMEOUT_S, metadata=upstream.metadata()
    )
    try:
        async for message in stream:
            return message
    except (TimeoutError, grpc.aio.AioRpcError):
        return None
    finally:
        stream.cancel()
    return None


async def metrics(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request.app[UPSTREAM])
    bridge = request.app[METRICS]
    text = render(
        snapshot,
        counters=bridge.counter_samples(),
        histograms=bridge.histogram_samples(),
        help_texts=BRIDGE_HELP,
    )
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
