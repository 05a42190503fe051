"""Assembling the bridge (``create_app``) and running it (``serve``).

``create_app`` takes settings and an ``Upstream`` so tests can bind ``127.0.0.1:0`` and point it at
a server they started; ``serve`` runs until SIGTERM/SIGINT, then stops accepting, lets requests in
flight finish, and closes the channel. aiohttp cancels the handler of a client that disconnects
(``handler_cancellation``), which cancels its gRPC call and so its queued work on the server.
With ``--tracing`` the app and the channel are traced (``sie_bridge.tracing``,
docs/observability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from sie_sdk.api_keys import ApiKeys
from sie_sdk.metrics import Metrics

from sie_bridge import openapi
from sie_bridge.auth import auth_middleware
from sie_bridge.config import BridgeSettings
from sie_bridge.errors import Handler, error_middleware
from sie_bridge.negotiate import SERVER_VERSION, VERSION_HEADER
from sie_bridge.routes import inference, models, openai, ops, status, stream
from sie_bridge.state import METRICS, SETTINGS, UPSTREAM
from sie_bridge.upstream import Upstream

if TYPE_CHECKING:
    from sie_bridge.tracing import BridgeTracing

log = logging.getLogger(__name__)
#: The longest request line (method, path, version) and header line aiohttp parses; its default,
#: 8,190 bytes, would answer a long model name in the path with its own plain-text 400 before
#: the app sees it. Past this, aiohttp still answers that 400 (docs/reliability.md, Limits).
MAX_LINE_BYTES = 64 * 1024
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by route template (not raw path: bounded label values),
    and stamps the server version on every response."""
    started = time.perf_counter()
    response = await handler(request)
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    metrics = request.app[METRICS]
    metrics.inc(
        "sie_bridge_requests_total",
        route=template,
        method=request.method,
        status=str(response.status),
    )
    metrics.observe(
        "sie_bridge_request_duration_seconds",
        time.perf_counter() - started,
        SECONDS_BUCKETS,
        route=template,
    )
    if not response.prepared:
        response.headers[VERSION_HEADER] = SERVER_VERSION
    return response


def create_app(
    settings: BridgeSettings, upstream: Upstream, tracing: BridgeTracing | None = None
) -> web.Application:
    """The application over ``upstream``; traced with ``tracing`` (``start_bridge`` makes it
    from the settings, with the same provider as the upstream channel's interceptors)."""
    keys = ApiKeys(settings.api_keys, settings.api_keys_file)
    app = web.Application(
        # Outermost first: a refused key is counted, and answered through the one error mapping.
        middlewares=[metrics_middleware, error_middleware, auth_middleware(keys)],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[UPSTREAM] = upstream
    app[METRICS] = Metrics()
    # stream first: its /v1/encode/{model}/stream would match /v1/encode/{model:.+} too.
    for group in (stream, inference, models, openai, ops, status, openapi):
        group.add_routes(app)

    async def watch_credentials(app: web.Application) -> AsyncIterator[None]:
        watcher = asyncio.create_task(app[UPSTREAM].watch_credentials())
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    async def close_upstream(app: web.Application) -> None:
        await app[UPSTREAM].close()

    app.cleanup_ctx.append(watch_credentials)
    app.on_cleanup.append(close_upstream)
    if tracing is not None:
        tracing.install(app)
    return app


def bridge_tracing(settings: BridgeSettings) -> BridgeTracing | None:
    """The tracing the settings ask for (None: off); OpenTelemetry is imported only when on."""
    if not settings.tracing:
        return None
    try:
        from sie_bridge.tracing import BridgeTracing
    except ImportError as exc:
        raise SystemExit(
            f"--tracing needs OpenTelemetry (pip install 'sie[tracing]'): {exc}"
        ) from None
    return BridgeTracing.from_settings(settings)


@dataclass(slots=True)
class RunningBridge:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_bridge(settings: BridgeSettings, upstream: Upstream | None = None) -> RunningBridge:
    """Bind and start; returns the bound port (``--port 0`` picks a free one)."""
    tracing = bridge_tracing(settings)
    if upstream is None:
        upstream = Upstream(settings, tracing.client_interceptors() if tracing else ())
    app = create_app(settings, upstream, tracing)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = int(runner.addresses[0][1]) if runner.addresses else settings.port
    return RunningBridge(runner, port)


async def serve(settings: BridgeSettings) -> None:
    bridge = await start_bridge(settings)
    log.info(
        "sie-bridge listening on %s:%d, backend %s (%s; %s)",
        settings.host,
        bridge.port,
        settings.backend,
        "TLS" if settings.backend_tls is not None else "plaintext",
        "API keys required" if settings.api_keys or settings.api_keys_file else "no API keys",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await bridge.stop()
    log.info("stopped")
