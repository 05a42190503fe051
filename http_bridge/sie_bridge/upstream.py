"""The bridge's one long-lived gRPC channel to the server, and the calls made over it.

``target_of`` turns ``--backend`` into a gRPC target: one ``host:port`` stays as it is (DNS may
return several addresses), a comma-separated list of addresses becomes an ``ipv4:``/``ipv6:``
target, and grpc's own ``round_robin`` policy spreads calls over every address. The channel
reconnects by itself when the backend comes back; a call while it is down fails at once
(``wait_for_ready`` is off) and reads as ``BACKEND_UNAVAILABLE``.

``call`` runs one unary RPC under the configured deadline and turns a failed status into a
``BridgeError`` through ``sie_sdk.reasons``. When the HTTP client goes away, aiohttp cancels the
handler, the cancellation reaches the pending gRPC call, and the server drops its queued work.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.reasons import error_from_rpc
from sie_sdk.v1 import (
    encode_pb2_grpc,
    extract_pb2_grpc,
    models_pb2_grpc,
    score_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

from sie_bridge.config import BridgeSettings
from sie_bridge.errors import BridgeError

Resp = TypeVar("Resp")
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def target_of(backend: str) -> str:
    """A gRPC target for ``--backend`` (see the module docstring)."""
    parts = [part.strip() for part in backend.split(",") if part.strip()]
    if not parts:
        raise SystemExit("--backend is empty")
    if len(parts) == 1:
        return parts[0]
    addresses = [_resolve(part) for part in parts]
    families = {"ipv6" if address.startswith("[") else "ipv4" for address in addresses}
    if len(families) > 1:
        raise SystemExit(f"--backend mixes IPv4 and IPv6 addresses: {backend}")
    return f"{families.pop()}:{','.join(addresses)}"


def _resolve(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--backend address {address!r} is not host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # a name in a list: resolve it once, at startup
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port))[0][4][0])
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--backend host {host!r} does not resolve: {exc}") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class Upstream:
    """The channel and one stub per service."""

    channel: grpc.aio.Channel
    timeout_s: float

    def __init__(self, settings: BridgeSettings) -> None:
        self.timeout_s = settings.request_timeout_s
        self.channel = grpc.aio.insecure_channel(
            target_of(settings.backend),
            options=[
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.keepalive_time_ms", 30000),
                # Reconnect quickly when the backend comes back (default backoff reaches 120 s).
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.initial_reconnect_backoff_ms", 200),
            ],
        )
        self.encode = encode_pb2_grpc.EncodeServiceStub(self.channel)
        self.score = score_pb2_grpc.ScoreServiceStub(self.channel)
        self.extract = extract_pb2_grpc.ExtractServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self.status = status_pb2_grpc.StatusServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def call(self, method: Callable[..., Awaitable[Resp]], request: Any) -> Resp:
        """One unary call under the request deadline; failures become ``BridgeError``."""
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise BridgeError(error_from_rpc(exc)) from None

    async def ready(self, timeout_s: float = 2.0) -> tuple[bool, str]:
        """(serving?, why) from the backend's standard gRPC health service."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return False, f"backend unreachable: {exc.code().name}: {exc.details()}"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, status

    def watch_status(
        self, interval_ms: int
    ) -> grpc.aio.UnaryStreamCall[status_pb2.WatchStatusRequest, status_pb2.WatchStatusResponse]:
        """The server's status stream (no deadline: it runs until either side ends it)."""
        return self.status.WatchStatus(status_pb2.WatchStatusRequest(interval_ms=interval_ms))

    async def close(self) -> None:
        await self.channel.close(None)
