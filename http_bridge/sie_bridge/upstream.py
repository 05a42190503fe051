"""The bridge's one long-lived gRPC channel to the server, and the calls made over it.

``--backend`` becomes a gRPC target by ``sie_sdk.targets.grpc_target`` (the SDK's gRPC transport
uses it too), and grpc's own ``round_robin`` policy spreads calls over every address. The channel
reconnects by itself when the backend comes back; a call while it is down fails at once
(``wait_for_ready`` is off) and reads as ``BACKEND_UNAVAILABLE``.

``call`` runs one unary RPC under the configured deadline and turns a failed status into a
``BridgeError`` through ``sie_sdk.reasons``. When the HTTP client goes away, aiohttp cancels the
handler, the cancellation reaches the pending gRPC call, and the server drops its queued work.

Credentials (docs/security.md): the channel is TLS when the settings ask for it
(``BridgeSettings.backend_tls``). ``watch_credentials`` (a task of the app) checks the PEM files
every second; once they have changed and then stayed the same for one check (a rotation writes
several files), it opens a new channel with them for the calls that follow, and closes the old
one once the calls still on it have had their deadline. Files that do not load
(a rotation half written) keep the current channel, with a warning. Every call carries ``authorization`` metadata: the bridge's own
``--backend-api-key`` when it has one, else the client's ``Authorization`` header, forwarded as
it came (``CLIENT_AUTHORIZATION``, set per request by ``sie_bridge.auth``), so the server stays
the one place where keys are checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.api_keys import AUTHORIZATION
from sie_sdk.reasons import error_from_rpc
from sie_sdk.targets import ROUND_ROBIN
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

log = logging.getLogger(__name__)
Resp = TypeVar("Resp")
#: How often ``watch_credentials`` looks at the TLS files.
CREDENTIALS_CHECK_S = 1.0
Metadata = tuple[tuple[str, str], ...]
#: The ``Authorization`` header of the HTTP request being served (None outside one, or without).
CLIENT_AUTHORIZATION: ContextVar[str | None] = ContextVar("client_authorization", default=None)


class Upstream:
    """The channel and one stub per service."""

    channel: grpc.aio.Channel
    timeout_s: float

    def __init__(
        self,
        settings: BridgeSettings,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        """``interceptors``: run on every call (tracing's client spans, ``sie_bridge.tracing``)."""
        self.timeout_s = settings.request_timeout_s
        self.backend_api_key = settings.backend_api_key
        self._options = [
            ("grpc.service_config", ROUND_ROBIN),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30000),
            # Reconnect quickly when the backend comes back (default backoff reaches 120 s).
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.initial_reconnect_backoff_ms", 200),
        ]
        self._target, self._tls = settings.backend_target, settings.backend_tls
        self._interceptors = list(interceptors) or None
        self._tls_stamp = self._tls.stamp() if self._tls is not None else ()
        self._changed_stamp: tuple[tuple[int, int, int], ...] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._open(self._tls.credentials() if self._tls is not None else None)

    def _open(self, credentials: grpc.ChannelCredentials | None) -> None:
        """A channel (TLS with ``credentials``) and one stub per service on it."""
        self.channel = (
            grpc.aio.secure_channel(
                self._target, credentials, options=self._options, interceptors=self._interceptors
            )
            if credentials is not None
            else grpc.aio.insecure_channel(
                self._target, options=self._options, interceptors=self._interceptors
            )
        )
        self.encode = encode_pb2_grpc.EncodeServiceStub(self.channel)
        self.score = score_pb2_grpc.ScoreServiceStub(self.channel)
        self.extract = extract_pb2_grpc.ExtractServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self.status = status_pb2_grpc.StatusServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def reload_credentials(self) -> bool:
        """A new channel when the TLS files changed, then stayed as they are since the last
        check, and load; True when it switched."""
        if self._tls is None:
            return False
        stamp = self._tls.stamp()
        if stamp == self._tls_stamp:
            self._changed_stamp = None
            return False
        if stamp != self._changed_stamp:  # still being written, perhaps: look again next time
            self._changed_stamp = stamp
            return False
        try:
            credentials = self._tls.credentials()
        except (OSError, ValueError) as exc:
            log.warning("backend TLS files changed but do not load (kept the channel): %s", exc)
            return False
        self._tls_stamp = stamp
        old = self.channel
        self._open(credentials)
        log.info("backend TLS files changed: new calls use a new channel")
        retire = asyncio.get_running_loop().create_task(self._close_later(old))
        self._retired.add(retire)
        retire.add_done_callback(self._retired.discard)
        return True

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(self.timeout_s)
        await channel.close(None)

    async def watch_credentials(self) -> None:
        """Until cancelled: ``reload_credentials`` every ``CREDENTIALS_CHECK_S``."""
        while self._tls is not None:
            await asyncio.sleep(CREDENTIALS_CHECK_S)
            self.reload_credentials()

    def metadata(self) -> Metadata:
        """The ``authorization`` metadata of a backend call: the bridge's own key, else the
        client's header as it came (when gRPC metadata can carry it: printable ASCII)."""
        if self.backend_api_key:
            return ((AUTHORIZATION, f"Bearer {self.backend_api_key}"),)
        forwarded = CLIENT_AUTHORIZATION.get()
        if forwarded and forwarded.isascii() and forwarded.isprintable():
            return ((AUTHORIZATION, forwarded),)
        return ()

    async def call(self, method: Callable[..., Awaitable[Resp]], request: Any) -> Resp:
        """One unary call under the request deadline; failures become ``BridgeError``."""
        try:
            return await method(request, timeout=self.timeout_s, metadata=self.metadata())
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
        return self.status.WatchStatus(
            status_pb2.WatchStatusRequest(interval_ms=interval_ms), metadata=self.metadata()
        )

    async def close(self) -> None:
        for retire in list(self._retired):
            retire.cancel()
        await self.channel.close(None)
