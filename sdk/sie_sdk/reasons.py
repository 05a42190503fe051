"""The one error vocabulary (``sie.v1.ErrorReason``) and what each reason means on each transport.

``REASONS`` is the single table: for every reason, the gRPC status code the server answers with,
the HTTP status the bridge answers with, the SDK exception class (by name, in
``sie_sdk.client.errors``) and whether retrying can help (then the server sends
``google.rpc.RetryInfo`` and the bridge ``Retry-After``; the SDK retries the reasons marked
``sdk_retries``). The server's gRPC mapping, the bridge's HTTP mapping and the SDK's exception
mapping all read this table, and a test holds every ``ErrorReason`` to exactly one row.

``error_from_rpc`` reads a failed call back into an ``ErrorDetail``: the reason from the status's
``google.rpc.ErrorInfo`` when the server sent one, else a reason inferred from the bare gRPC code
(a channel that cannot connect, a deadline, a message over the size limit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from sie_sdk.v1 import common_pb2

ERROR_DOMAIN = "sie.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: ErrorInfo metadata (and HTTP error body field) of an encode refused because its response
#: would pass the message limit: how many items like these fit in one request.
ITEMS_THAT_FIT = "items_that_fit"
_PREFIX = "ERROR_REASON_"


@dataclass(frozen=True, slots=True)
class Reason:
    """One row: a reason and its meaning on each transport."""

    name: str
    grpc_code: grpc.StatusCode
    http_status: int
    #: The ``sie_sdk.client.errors`` class an SDK call raises.
    sdk_error: str
    #: Seconds after which a retry may succeed; None when retrying does not help.
    retry_after_s: float | None = None
    #: Whether the SDK retries it by itself (with backoff, within ``provision_timeout_s``).
    sdk_retries: bool = False


_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

REASONS: Mapping[str, Reason] = {
    row.name: row
    for row in (
        Reason("INVALID_INPUT", grpc.StatusCode.INVALID_ARGUMENT, 400, "RequestError"),
        Reason("INPUT_TOO_LONG", grpc.StatusCode.INVALID_ARGUMENT, 400, "InputTooLongError"),
        Reason("MODEL_NOT_FOUND", grpc.StatusCode.NOT_FOUND, 404, "RequestError"),
        Reason("MODEL_NOT_LOADED", _UNAVAILABLE, 503, "ProvisioningError", 1.0, True),
        Reason("MODEL_LOADING", _UNAVAILABLE, 503, "ProvisioningError", 2.0, True),
        Reason("MODEL_LOAD_FAILED", _FAILED_PRECONDITION, 502, "ServerError"),
        Reason("QUEUE_FULL", _RESOURCE_EXHAUSTED, 503, "ServerError", 0.5, True),
        Reason("RESOURCE_EXHAUSTED", _RESOURCE_EXHAUSTED, 503, "ServerError", 1.0),
        Reason("LORA_LOADING", _UNAVAILABLE, 503, "LoraLoadingError", 1.0, True),
        Reason("DEPENDENCY_CONFLICT", _FAILED_PRECONDITION, 409, "RequestError"),
        Reason("INFERENCE_ERROR", grpc.StatusCode.INTERNAL, 500, "ServerError"),
        Reason("INTERNAL_ERROR", grpc.StatusCode.INTERNAL, 500, "ServerError"),
        Reason("DEADLINE_EXCEEDED", grpc.StatusCode.DEADLINE_EXCEEDED, 504, "ServerError"),
        Reason("SHUTTING_DOWN", _UNAVAILABLE, 503, "ServerError", 1.0, True),
        Reason("BACKEND_UNAVAILABLE", _UNAVAILABLE, 503, "SIEConnectionError", 1.0, True),
        Reason("REQUEST_TOO_LARGE", _RESOURCE_EXHAUSTED, 413, "RequestError"),
        Reason("UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, 401, "AuthenticationError"),
    )
}

#: The reason a bare gRPC status (no ErrorInfo: raised by grpc itself, not by our server) means.
REASON_BY_BARE_CODE: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "BACKEND_UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "REQUEST_TOO_LARGE",
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_INPUT",
    grpc.StatusCode.NOT_FOUND: "MODEL_NOT_FOUND",
    grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED",
}

#: grpc core's own message for a call whose stream broke under it (the server stopped or reset
#: the connection mid-call): a bare INTERNAL that means the backend went away, not a fault of
#: the call, so it reads as BACKEND_UNAVAILABLE (retryable) like a bare UNAVAILABLE.
CORE_STREAM_BROKEN = "Internal error from Core"
#: grpc's message for a call its own caller cancelled (sync API; grpc.aio raises
#: asyncio.CancelledError instead). Any other bare CANCELLED is the server's side resetting the
#: stream (a replica killed or stopping mid-call), which reads as BACKEND_UNAVAILABLE.
LOCALLY_CANCELLED = "Locally cancelled by application!"


def _broken_stream(code: grpc.StatusCode, message: str) -> bool:
    """A bare status that says the call's stream broke because the backend went away."""
    if code == grpc.StatusCode.INTERNAL:
        return message == CORE_STREAM_BROKEN
    return code == grpc.StatusCode.CANCELLED and message != LOCALLY_CANCELLED


def reason_names() -> tuple[str, ...]:
    """Every reason of the proto enum, without its prefix (UNSPECIFIED left out)."""
    return tuple(
        name.removeprefix(_PREFIX)
        for name in common_pb2.ErrorReason.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
        if name != _PREFIX + "UNSPECIFIED"
    )


def reason(name: str) -> Reason:
    """The row of ``name``; unknown names (a newer server) read as INTERNAL_ERROR."""
    return REASONS.get(name, REASONS["INTERNAL_ERROR"])


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """A failed call, transport-neutral: what the HTTP body and SDK exceptions are built from."""

    reason: str
    message: str
    model: str | None = None
    retry_after_s: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        return reason(self.reason).http_status

    def retry_after_header(self) -> str | None:
        """``Retry-After`` (whole seconds, at least 1) when retrying helps."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


def error_from_rpc(error: grpc.RpcError) -> ErrorDetail:
    """Read a failed call's reason, message, model and retry hint from its status details."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    # Sync calls give (key, value) namedtuples, aio calls a Metadata of (key, value) pairs.
    trailers = cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ())
    detail = _from_details(trailers, message)
    if detail is not None:
        return detail
    name = REASON_BY_BARE_CODE.get(code, "INTERNAL_ERROR")
    if _broken_stream(code, message):
        name = "BACKEND_UNAVAILABLE"
    if name == "BACKEND_UNAVAILABLE":
        message = f"the SIE gRPC server is unavailable: {message}"
    return ErrorDetail(name, message, retry_after_s=REASONS[name].retry_after_s)


def _from_details(trailers: Iterable[tuple[str, str | bytes]], message: str) -> ErrorDetail | None:
    raw = next((value for key, value in trailers if key == STATUS_DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return None
    status = status_pb2.Status.FromString(raw)
    info: error_details_pb2.ErrorInfo | None = None
    retry_after_s: float | None = None
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            retry_after_s = retry.retry_delay.ToMilliseconds() / 1000.0
    if info is None or info.domain != ERROR_DOMAIN:
        return None
    metadata = dict(info.metadata)
    return ErrorDetail(
        info.reason,
        status.message or message,
        model=metadata.get("model"),
        retry_after_s=retry_after_s,
        metadata=metadata,
    )
