"""The bridge's one long-lived gRPC channel to the server, and the calls made over it.

``--backend`` becomes a gRPC target by ``sie_sdk.targets.grpc_target`` (the SDK's gRPC transport
uses it too), and grpc's own ``round_robin`` policy spreads calls over every address. The channel
reconnects by itself when the backend comes back; a call while it is down fails at once
(``wait_for_ready`` is off) and reads as ``BACKEND_UNAVAILABLE``.

``call`` runs one unary RPC under the configured deadline and turns a failed status into a
``BridgeError`` through ``sie_sdk.reasons``. When the HTTP client goes away, aiohttp cancels the
handler, the cancellation reaches the pending gRPC call, and the server drops its queued work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.reasons import error_from_rpc
from sie_sdk.targets import ROUND_ROBIN, grpc_target
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


class Upstream:
    """The channel and one stub per service."""

    channel: grpc.aio.Channel
    timeout_s: float

    def __init__(self, settings: BridgeSettings) -> None:
        self.timeout_s = settings.request_timeout_s
        self.channel = grpc.aio.insecure_channel(
            grpc_target(settings.backend),
            options=[
                ("grpc.service_config", ROUND_ROBIN),
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
