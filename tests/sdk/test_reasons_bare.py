"""How a bare gRPC status (no ErrorInfo: grpc's own, not our server's) reads as a reason."""

from __future__ import annotations

import grpc
import pytest
from sie_sdk.reasons import CORE_STREAM_BROKEN, LOCALLY_CANCELLED, error_from_rpc


class BareError(grpc.RpcError):
    """A failed call as grpc reports one it raised itself: a code, a message, no trailers."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize(
    ("code", "details", "reason", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect", "BACKEND_UNAVAILABLE", True),
        # The server stopped mid-stream: grpc core resets the call with this bare INTERNAL.
        (grpc.StatusCode.INTERNAL, CORE_STREAM_BROKEN, "BACKEND_UNAVAILABLE", True),
        # A replica killed or stopping mid-call resets the stream: a bare CANCELLED, no message.
        (grpc.StatusCode.CANCELLED, "CANCELLED", "BACKEND_UNAVAILABLE", True),
        # The caller's own cancellation is not the backend's absence.
        (grpc.StatusCode.CANCELLED, LOCALLY_CANCELLED, "INTERNAL_ERROR", False),
        # Any other bare INTERNAL (e.g. a response that does not deserialize) is not retried.
        (grpc.StatusCode.INTERNAL, "Failed to deserialize", "INTERNAL_ERROR", False),
        (grpc.StatusCode.UNKNOWN, "Exception calling application", "INTERNAL_ERROR", False),
    ],
)
def test_bare_statuses_read_as_reasons(
    code: grpc.StatusCode, details: str, reason: str, retryable: bool
) -> None:
    detail = error_from_rpc(BareError(code, details))
    assert detail.reason == reason
    assert (detail.retry_after_s is not None) == retryable
    assert details in detail.message
