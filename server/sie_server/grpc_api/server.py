"""Assembling the gRPC server (``create_server``) and running it until SIGTERM (``serve``).

With API keys configured every call but health and reflection needs one (``grpc_api.auth``);
with ``--tls-cert``/``--tls-key`` the port serves TLS (mTLS with ``--tls-client-ca``), reloading
the certificate when its files change (``grpc_api.tls``). See docs/security.md. With ``--uds``
the same services also answer on a Unix domain socket, for a bridge or client on the same host.

Lifecycle of a ``RunningServer``: ``set_serving(True)`` once preloading is done (health is SERVING
while no compute lane is stuck, ``grpc_api.compute_watch``); ``drain`` reports NOT_SERVING and
ends every open status stream; ``stop(grace)`` refuses new calls, lets
in-flight ones finish within ``grace``, then closes the metrics port (when one was asked for)
and the engine, and flushes the traces (``--tracing``, docs/observability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sie_sdk.api_keys import ApiKeys
from sie_sdk.prometheus import render
from sie_sdk.v1 import (
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2,
    extract_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

from sie_server.catalog import Catalog, load_catalog
from sie_server.config import Settings
from sie_server.device import compute_layout, default_batch_tokens, resolve_placement
from sie_server.engine.executor import ExecutorConfig
from sie_server.engine.registry import EngineConfig, ModelRegistry
from sie_server.errors import SIEServerError
from sie_server.grpc_api.auth import RequireApiKey
from sie_server.grpc_api.compute_watch import watch_compute
from sie_server.grpc_api.encode_service import EncodeServicer
from sie_server.grpc_api.extract_service import ExtractServicer
from sie_server.grpc_api.interceptors import RejectMalformed, StreamDrain
from sie_server.grpc_api.model_service import ModelServicer
from sie_server.grpc_api.score_service import ScoreServicer
from sie_server.grpc_api.status import StatusServicer, StatusSource
from sie_server.grpc_api.tls import CertificateFiles, server_credentials
from sie_server.observability.metrics_http import MetricsHTTPServer
from sie_server.observability.tracing import Tracing, server_tracing

log = logging.getLogger(__name__)
#: grpc's public asyncio health servicer (grpc-stubs' health.pyi predates ``health.aio``).
AioHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (encode_pb2, "EncodeService"),
        (score_pb2, "ScoreService"),
        (extract_pb2, "ExtractService"),
        (models_pb2, "ModelService"),
        (status_pb2, "StatusService"),
    )
)


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    registry: ModelRegistry
    health: Any  # AioHealthServicer
    status: StatusServicer
    #: The Prometheus endpoint, when ``--metrics-port`` was given.
    metrics_http: MetricsHTTPServer | None = None
    #: What ``set_serving`` asked for, and whether a compute lane is stuck (compute_watch):
    #: health is SERVING only when the first holds and the second does not.
    serving: bool = False
    compute_stuck: bool = False
    #: The compute watch (``--stuck-compute-s``), cancelled by ``stop``.
    watch: asyncio.Task[None] | None = None

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port; None without ``--metrics-port``."""
        return self.metrics_http.port if self.metrics_http is not None else None

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        await self._report()

    async def set_compute_stuck(self, stuck: bool) -> None:
        self.compute_stuck = stuck
        await self._report()

    async def _report(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving and not self.compute_stuck
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self) -> None:
        """NOT_SERVING for every service from now on (later ``set`` calls are ignored); open
        status streams end."""
        await self.health.enter_graceful_shutdown()
        self.status.end_streams()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace_s``, stop the engine."""
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
        await self.drain()
        await self.server.stop(grace_s)
        if self.metrics_http is not None:
            await self.metrics_http.close()
        await self.registry.close()
        await asyncio.to_thread(self.registry.config.executor.tracing.shutdown)


def build_registry(settings: Settings) -> ModelRegistry:
    catalog = load_catalog(settings.catalog_dirs)
    for flag, names in (("--models", settings.models), ("--preload", settings.preload)):
        unknown = [name for name in names if name not in catalog]
        if unknown:
            raise SystemExit(f"{flag} names models not in the catalog: {', '.join(unknown)}")
    if settings.models:
        outside = [name for name in settings.preload if name not in settings.models]
        if outside:
            raise SystemExit(f"--preload names models outside --models: {', '.join(outside)}")
        catalog = Catalog(spec for name, spec in catalog.items() if name in settings.models)
    placement = resolve_placement(settings.device, settings.dtype)
    shared_lane = settings.model_threads == "shared" or (
        settings.model_threads == "auto" and placement.device == "cpu"
    )
    threads, workers = compute_layout(placement, settings.compute_workers)
    config = EngineConfig(
        executor=ExecutorConfig(
            max_batch_tokens=settings.max_batch_tokens or default_batch_tokens(placement),
            max_batch_items=settings.max_batch_items,
            max_batch_padding=settings.max_batch_padding,
            max_batch_skips=None if settings.max_batch_skips < 0 else settings.max_batch_skips,
            batch_wait_ms=settings.batch_wait_ms,
            max_pending_tokens=settings.max_pending_tokens,
            max_pending_items=settings.max_pending_items,
            max_preparing_requests=settings.max_preparing_requests,
            bulk_batch_items=settings.bulk_batch_items,
            bulk_grace_ms=settings.bulk_grace_ms,
            bulk_hold_max_ms=settings.bulk_hold_max_ms,
            malloc_trim_interval_s=settings.malloc_trim_interval_s,
            tracing=server_tracing(settings),
        ),
        placement=placement,
        tokenizer_workers=settings.tokenizer_workers,
        inline_max_chars=settings.inline_max_chars,
        image_workers=settings.image_workers,
        limits=settings.request_limits(),
        load_retry_s=settings.load_retry_s,
        max_loras_per_model=settings.max_loras_per_model,
        memory_budget_bytes=settings.memory_budget_mb * 2**20,
        memory_gauge=settings.memory_gauge,
        max_response_bytes=settings.max_message_bytes,
        engine=settings.engine,
        shared_compute_thread=shared_lane,
        compute_workers=workers,
        compute_threads=threads,
    )
    registry = ModelRegistry(catalog, config)
    registry.check_catalog()
    return registry


def _interceptors(settings: Settings, tracing: Tracing) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """Tracing's span first (refused calls are traced too), then the key check (a refused call
    is not even parsed), then malformed requests."""
    keys = ApiKeys(settings.api_keys, settings.api_keys_file)
    drain = StreamDrain(settings.stream_drain_idle_s, settings.stream_drain_limit_s)
    malformed = RejectMalformed(drain)
    checks = [RequireApiKey(keys), malformed] if keys.enabled else [malformed]
    return [*tracing.server_interceptors(), *checks]


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Add the port (TLS when a certificate is configured) and ``--uds``'s socket; the bound
    port number."""
    if settings.uds is not None:
        _bind_socket(server, settings.uds)
    address = f"{_host(settings.host)}:{settings.port}"
    if settings.tls_cert is None or settings.tls_key is None:
        return server.add_insecure_port(address)
    files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    try:
        credentials = server_credentials(files)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--tls-cert/--tls-key do not load: {exc}") from None
    return server.add_secure_port(address, credentials)


#: The longest path a Unix domain socket can have on Linux (``sun_path`` less its NUL).
MAX_SOCKET_PATH_BYTES = 107


def _bind_socket(server: grpc.aio.Server, path: Path) -> None:
    """Listen on the Unix domain socket ``path``. grpc replaces a stale socket file there and
    removes it at stop; one that still answers belongs to a live server and is left alone."""
    size = len(os.fsencode(path.absolute()))
    if size > MAX_SOCKET_PATH_BYTES:
        raise SystemExit(
            f"--uds {path}: the path is {size} bytes, and a Unix socket's path can have at "
            f"most {MAX_SOCKET_PATH_BYTES}"
        )
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            pass  # stale: nobody listens
        else:
            raise SystemExit(f"--uds {path}: another process is listening on that socket")
        finally:
            probe.close()
    try:
        server.add_insecure_port(f"unix://{path.absolute()}")
    except RuntimeError:
        why = "its folder does not exist" if not path.parent.is_dir() else "a file is in the way"
        raise SystemExit(f"--uds {path}: cannot listen there ({why})") from None


async def create_server(settings: Settings, registry: ModelRegistry) -> RunningServer:
    """Bind and start (health NOT_SERVING until ``set_serving(True)``); returns the bound port."""
    server = grpc.aio.server(
        interceptors=_interceptors(settings, registry.config.executor.tracing),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            *_connection_age(settings),
        ],
    )
    limits = settings.request_limits()
    encode_pb2_grpc.add_EncodeServiceServicer_to_server(EncodeServicer(registry, limits), server)
    score_pb2_grpc.add_ScoreServiceServicer_to_server(ScoreServicer(registry, limits), server)
    extract_pb2_grpc.add_ExtractServiceServicer_to_server(ExtractServicer(registry, limits), server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry), server)
    source = StatusSource(registry)
    status = StatusServicer(source, settings.status_interval_ms)
    status_pb2_grpc.add_StatusServiceServicer_to_server(status, server)
    health_servicer = AioHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = _bind(server, settings)
    if port == 0:
        raise SystemExit(f"could not bind {settings.host}:{settings.port}")
    metrics_http = None
    if settings.metrics_port is not None:

        async def metrics_text() -> str:
            return render(await source.snapshot())

        metrics_http = MetricsHTTPServer(metrics_text)
        await metrics_http.start(settings.host, settings.metrics_port)
    await server.start()
    running = RunningServer(server, port, registry, health_servicer, status, metrics_http)
    await running.set_serving(False)
    if settings.stuck_compute_s > 0:
        running.watch = asyncio.create_task(
            watch_compute(registry, settings.stuck_compute_s, running.set_compute_stuck),
            name="sie-compute-watch",
        )
    return running


def _tls_mode(settings: Settings) -> str:
    if settings.tls_cert is None:
        return "plaintext"
    return "mTLS" if settings.tls_client_ca is not None else "TLS"


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    """``--max-connection-age-s``: grpc closes each connection that old with a GOAWAY, after
    which clients reconnect (re-resolving their target); calls in flight get the grace period."""
    if settings.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
    ]


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT: preload, SERVING, then drain and exit cleanly."""
    registry = build_registry(settings)
    running = await create_server(settings, registry)
    if settings.uds is not None:
        log.info("gRPC also on unix://%s", settings.uds.absolute())
    log.info(
        "sie-server listening on %s:%d (device %s, %s; %s; %s)",
        settings.host,
        running.port,
        registry.config.placement.device,
        registry.config.placement.dtype,
        _tls_mode(settings),
        "API keys required" if settings.api_keys or settings.api_keys_file else "no API keys",
    )
    if running.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.host, running.metrics_port)
    if settings.tracing:
        log.info("tracing on: OTLP to %s", settings.otlp_endpoint or "the OTEL_EXPORTER_* endpoint")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        # NOT_SERVING at once, through the health servicer's own graceful shutdown: a preload
        # still running can never turn it back to SERVING.
        if not stop.is_set():
            stop.set()
            draining.append(loop.create_task(running.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    for name in settings.preload:
        log.info("preloading %s", name)
        load = loop.create_task(registry.load(name))
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            log.info("signal during preload: not loading the rest")
            break
        try:
            load.result()
        except SIEServerError as exc:
            log.error("preload failed, exiting: %s", exc.message)
            await running.stop(0)
            raise SystemExit(1) from None
    if not stop.is_set():
        await running.set_serving(True)
        log.info(
            "ready: %d models in the catalog, %d preloaded",
            len(registry.catalog),
            len(settings.preload),
        )
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining for %.1fs", settings.drain_delay_s)
    await running.drain()
    await asyncio.sleep(settings.drain_delay_s)
    await running.stop(settings.grace_period_s)
    log.info("stopped")
