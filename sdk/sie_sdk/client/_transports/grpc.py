"""The gRPC transport: straight to the server, one channel per client.

A call's body (the HTTP API's shape) becomes the proto request through ``sie_sdk.convert.to_proto``
and the reply comes back through ``sie_sdk.convert.from_proto``, the same conversions the bridge
runs, so both transports hand the core identical responses; vectors end as numpy views of the
reply's bytes. ``GrpcTransport`` (blocking channel) and ``AsyncGrpcTransport`` (``grpc.aio``)
differ only in how they wait.

Targets: ``grpc://host:port`` or a bare ``host:port`` (plaintext), ``grpcs://host:port`` (TLS with
the system roots), or a comma-separated address list spread with grpc's ``round_robin``. A
``grpcs://`` URL takes PEM file paths as query parameters: ``tls_ca`` (the CA that signs the
server's certificate, instead of the system roots) and, for mTLS, ``tls_cert`` and ``tls_key``
(the client's certificate chain and key), e.g.
``grpcs://sie.internal:50051?tls_ca=/etc/sie/ca.pem``. The API key goes out as
``authorization: Bearer <key>`` metadata on every call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sie_sdk.client._transports.base import CallOptions, Kind, Operation
from sie_sdk.client.errors import SIEError, error_from_detail
from sie_sdk.convert import from_proto, to_proto
from sie_sdk.reasons import REASONS, ErrorDetail, error_from_rpc
from sie_sdk.targets import ROUND_ROBIN, grpc_target
from sie_sdk.tls import ClientTLS
from sie_sdk.v1 import (
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    score_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)
from sie_sdk.wire import unpacked

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


#: The query parameters of a ``grpcs://`` URL -> the ``ClientTLS`` field each sets.
TLS_PARAMS = {"tls_ca": "ca", "tls_cert": "cert", "tls_key": "key"}


@dataclass(frozen=True, slots=True)
class Target:
    """Where a gRPC client connects: the gRPC target, and TLS (None: plaintext)."""

    address: str
    tls: ClientTLS | None = None


def parse_target(base_url: str) -> Target:
    """The target of ``grpc://``, ``grpcs://`` (with its TLS parameters) or a bare address
    (list); ``ValueError`` for an unknown parameter or TLS parameters on a plaintext URL."""
    url, _, query = base_url.partition("?")
    secure = url.startswith("grpcs://")
    address = grpc_target(url.removeprefix("grpcs://").removeprefix("grpc://").rstrip("/"))
    files: dict[str, Path] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in TLS_PARAMS:
            known = ", ".join(TLS_PARAMS)
            raise ValueError(f"unknown parameter {name!r} in {base_url!r} (known: {known})")
        if not value:
            raise ValueError(f"parameter {name!r} in {base_url!r} has no file path")
        files[TLS_PARAMS[name]] = Path(value).expanduser()
    if files and not secure:
        raise ValueError(f"TLS parameters need a grpcs:// URL, got {base_url!r}")
    return Target(address, ClientTLS(**files) if secure else None)


def _options() -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", ROUND_ROBIN),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def _metadata(call: CallOptions) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {call.api_key}"),) if call.api_key else ()


def _request(op: Operation, body: Mapping[str, Any] | None) -> Any:
    if op.kind is Kind.ENCODE:
        return to_proto.encode_request(op.model, body)
    if op.kind is Kind.SCORE:
        return to_proto.score_request(op.model, body)
    if op.kind is Kind.EXTRACT:
        return to_proto.extract_request(op.model, body)
    if op.kind is Kind.LIST_MODELS:
        return models_pb2.ListModelsRequest()
    return models_pb2.GetModelRequest(name=op.model)


def _response(op: Operation, reply: Any) -> Any:
    if op.kind is Kind.ENCODE:
        return unpacked(from_proto.encode_response(reply))
    if op.kind is Kind.SCORE:
        return from_proto.score_response(reply)
    if op.kind is Kind.EXTRACT:
        return from_proto.extract_response(reply)
    if op.kind is Kind.LIST_MODELS:
        return {"models": [from_proto.model_info(info) for info in reply.models]}
    return from_proto.model_info(reply.model)


class _Stubs:
    """One stub per service on a channel (sync or aio: the stubs are built the same way)."""

    def __init__(self, channel: Any) -> None:
        self.encode = encode_pb2_grpc.EncodeServiceStub(channel)
        self.score = score_pb2_grpc.ScoreServiceStub(channel)
        self.extract = extract_pb2_grpc.ExtractServiceStub(channel)
        self.models = models_pb2_grpc.ModelServiceStub(channel)
        self.status = status_pb2_grpc.StatusServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def method(self, op: Operation) -> Callable[..., Any]:
        methods: dict[Kind, Callable[..., Any]] = {
            Kind.ENCODE: self.encode.Encode,
            Kind.SCORE: self.score.Score,
            Kind.EXTRACT: self.extract.Extract,
            Kind.LIST_MODELS: self.models.ListModels,
            Kind.GET_MODEL: self.models.GetModel,
        }
        return methods[op.kind]


def _failure(exc: grpc.RpcError) -> SIEError:
    return error_from_detail(error_from_rpc(exc))


def _stream_message(
    model: str, sequence: int, body: Mapping[str, Any], window: int
) -> encode_pb2.EncodeStreamRequest:
    """One EncodeStream message; ``window``: set on a stream's first message only (else 0)."""
    return encode_pb2.EncodeStreamRequest(
        sequence=sequence, request=to_proto.encode_request(model, body), window=window
    )


def _stream_outcome(message: encode_pb2.EncodeStreamResponse) -> tuple[int, Any]:
    """(sequence, the response in the HTTP API's shape, or the SIEError the request failed
    with: the one a unary call would raise)."""
    if message.WhichOneof("result") != "error":
        return message.sequence, unpacked(from_proto.encode_response(message.response))
    error = message.error
    detail = ErrorDetail(
        reason=error.reason if error.reason in REASONS else "INTERNAL_ERROR",
        message=error.message,
        model=error.metadata.get("model"),
        retry_after_s=error.retry_after_ms / 1000 if error.retry_after_ms else None,
        metadata=dict(error.metadata),
    )
    return message.sequence, error_from_detail(detail)


def _stream_messages(
    model: str, batches: Iterator[tuple[int, Mapping[str, Any]]], window: int
) -> Iterator[encode_pb2.EncodeStreamRequest]:
    for index, (sequence, body) in enumerate(batches):
        yield _stream_message(model, sequence, body, window if index == 0 else 0)


class GrpcTransport:
    def __init__(self, base_url: str) -> None:
        target = parse_target(base_url)
        self.channel = (
            grpc.secure_channel(target.address, target.tls.credentials(), _options())
            if target.tls is not None
            else grpc.insecure_channel(target.address, _options())
        )
        self.stubs = _Stubs(self.channel)

    def send(self, op: Operation, body: Mapping[str, Any] | None, call: CallOptions) -> Any:
        request = _request(op, body)
        try:
            reply = self.stubs.method(op)(request, timeout=call.timeout_s, metadata=_metadata(call))
        except grpc.RpcError as exc:
            raise _failure(exc) from exc
        return _response(op, reply)

    def ready(self, call: CallOptions) -> bool:
        try:
            reply = self.stubs.health.Check(
                health_pb2.HealthCheckRequest(), timeout=call.timeout_s, metadata=_metadata(call)
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def watch_status(self, interval_ms: int, call: CallOptions) -> Iterator[dict[str, Any]]:
        stream = self.stubs.status.WatchStatus(
            status_pb2.WatchStatusRequest(interval_ms=interval_ms), metadata=_metadata(call)
        )
        try:
            for message in stream:
                yield from_proto.status_message(message)
        except grpc.RpcError as exc:
            raise _failure(exc) from exc
        finally:
            stream.cancel()

    def encode_stream(
        self,
        model: str,
        batches: Iterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> Iterator[tuple[int, Any]]:
        """One EncodeStream: (sequence, response or SIEError) per batch, in order. No deadline:
        a bulk stream lasts as long as its input."""
        stream = self.stubs.encode.EncodeStream(
            _stream_messages(model, batches, window), metadata=_metadata(call)
        )
        try:
            for message in stream:
                yield _stream_outcome(message)
        except grpc.RpcError as exc:
            raise _failure(exc) from exc
        finally:
            stream.cancel()

    def close(self) -> None:
        self.channel.close()


class AsyncGrpcTransport:
    def __init__(self, base_url: str) -> None:
        target = parse_target(base_url)
        self.channel = (
            grpc.aio.secure_channel(target.address, target.tls.credentials(), _options())
            if target.tls is not None
            else grpc.aio.insecure_channel(target.address, _options())
        )
        self.stubs = _Stubs(self.channel)

    async def send(self, op: Operation, body: Mapping[str, Any] | None, call: CallOptions) -> Any:
        request = _request(op, body)
        try:
            reply = await self.stubs.method(op)(
                request, timeout=call.timeout_s, metadata=_metadata(call)
            )
        except grpc.RpcError as exc:
            raise _failure(exc) from exc
        return _response(op, reply)

    async def ready(self, call: CallOptions) -> bool:
        try:
            reply = await self.stubs.health.Check(
                health_pb2.HealthCheckRequest(), timeout=call.timeout_s, metadata=_metadata(call)
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def watch_status(
        self, interval_ms: int, call: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        stream = self.stubs.status.WatchStatus(
            status_pb2.WatchStatusRequest(interval_ms=interval_ms), metadata=_metadata(call)
        )
        try:
            async for message in stream:
                yield from_proto.status_message(message)
        except grpc.RpcError as exc:
            raise _failure(exc) from exc
        finally:
            stream.cancel()

    async def encode_stream(
        self,
        model: str,
        batches: AsyncIterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> AsyncIterator[tuple[int, Any]]:
        """One EncodeStream: (sequence, response or SIEError) per batch, in order."""

        async def messages() -> AsyncIterator[encode_pb2.EncodeStreamRequest]:
            index = 0
            async for sequence, body in batches:
                yield _stream_message(model, sequence, body, window if index == 0 else 0)
                index += 1
                if index == 1:
                    # The server's headers say it accepted the stream. Writing on before them,
                    # a refusal (a wrong API key) that arrives mid-write would read as a broken
                    # stream: grpc aio then reports INTERNAL instead (grpc/grpc#36066).
                    await stream.initial_metadata()
                    if stream.done():
                        return

        stream = self.stubs.encode.EncodeStream(messages(), metadata=_metadata(call))
        try:
            async for message in stream:
                yield _stream_outcome(message)
        except grpc.RpcError as exc:
            raise _failure(exc) from exc
        finally:
            stream.cancel()

    async def close(self) -> None:
        await self.channel.close(None)
