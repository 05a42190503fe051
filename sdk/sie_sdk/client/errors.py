"""The SDK's exceptions, raised the same way over both transports.

The tree (each error reason of ``sie.v1.ErrorReason`` maps to one class through the ``sdk_error``
column of ``sie_sdk.reasons.REASONS``, the table the server and the bridge read too)::

    SIEError                         base; every SDK error has .code, .status_code, .model
    ├── SIEConnectionError           the server cannot be reached (BACKEND_UNAVAILABLE, a refused
    │                                connection, a transport failure)
    ├── RequestError                 the request is wrong, 4xx: INVALID_INPUT, MODEL_NOT_FOUND,
    │   │                            DEPENDENCY_CONFLICT, REQUEST_TOO_LARGE; also raised before
    │   │                            sending for a body the SDK can tell is malformed
    │   ├── InputTooLongError        INPUT_TOO_LONG
    │   └── AuthenticationError      UNAUTHENTICATED: no API key, or one the server (or the
    │                                bridge) does not accept; never retried
    ├── ServerError                  the server failed, 5xx: INFERENCE_ERROR, INTERNAL_ERROR,
    │                                MODEL_LOAD_FAILED, QUEUE_FULL, RESOURCE_EXHAUSTED,
    │                                DEADLINE_EXCEEDED, SHUTTING_DOWN
    ├── ProvisioningError            the model is not ready (MODEL_LOADING, MODEL_NOT_LOADED)
    │                                within provision_timeout_s; .gpu, .retry_after
    ├── PoolError                    resource pools: a standalone server has none; .pool_name, .state
    └── LoraLoadingError             LORA_LOADING: an adapter still loading after the retries;
                                     .lora, .model

``code`` is the reason (``"QUEUE_FULL"``), ``status_code`` the HTTP status of its row (the same
over gRPC, so handlers need not know the transport). ``retry_after`` is the server's hint in
seconds where it gave one. ``details`` holds what else the server said of it (gRPC ErrorInfo
metadata, the HTTP error body's other fields), e.g. ``items_that_fit``. Foreign exceptions are
translated at the transport boundary and chained (``raise ... from exc``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from sie_sdk.reasons import ErrorDetail, reason

_NO_DETAILS: Mapping[str, str] = MappingProxyType({})


class SIEError(Exception):
    """Base class of every SDK error."""

    code: str | None
    status_code: int | None
    model: str | None
    retry_after: float | None
    #: What else the server said (ErrorInfo metadata, the error body's other fields).
    details: Mapping[str, str] = _NO_DETAILS

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        model: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.model = model
        self.retry_after = retry_after


class SIEConnectionError(SIEError):
    """The server cannot be reached."""


class RequestError(SIEError):
    """The request is invalid (4xx)."""


class InputTooLongError(RequestError):
    """The input exceeds the model's context (``INPUT_TOO_LONG``, 400)."""


class AuthenticationError(RequestError):
    """The call has no API key, or one the server or the bridge does not accept
    (``UNAUTHENTICATED``, 401). Not in the reference, whose 4xx handlers still catch it as a
    ``RequestError``."""


class ServerError(SIEError):
    """The server failed the request (5xx)."""


class ProvisioningError(SIEError):
    """The model did not become ready within ``provision_timeout_s``."""

    def __init__(self, message: str, *, gpu: str | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.gpu = gpu


class PoolError(SIEError):
    """A resource-pool operation failed (a standalone server has no pools)."""

    def __init__(self, message: str, *, pool_name: str = "", state: str = "unsupported") -> None:
        super().__init__(message, code="POOLS_UNSUPPORTED")
        self.pool_name = pool_name
        self.state = state


class LoraLoadingError(SIEError):
    """A LoRA adapter was still loading after the retries."""

    def __init__(self, message: str, *, lora: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.lora = lora


_CLASSES: dict[str, type[SIEError]] = {
    cls.__name__: cls
    for cls in (
        SIEError,
        SIEConnectionError,
        RequestError,
        InputTooLongError,
        AuthenticationError,
        ServerError,
        ProvisioningError,
        PoolError,
        LoraLoadingError,
    )
}


def error_class(reason_name: str) -> type[SIEError]:
    """The class a reason raises (its row's ``sdk_error``)."""
    return _CLASSES[reason(reason_name).sdk_error]


def error_from_detail(detail: ErrorDetail, *, gpu: str | None = None) -> SIEError:
    """The exception for a failed call, whichever transport carried it."""
    cls = error_class(detail.reason)
    kwargs: dict[str, object] = {
        "code": detail.reason,
        "status_code": detail.http_status,
        "model": detail.model,
        "retry_after": detail.retry_after_s,
    }
    if cls is ProvisioningError:
        kwargs["gpu"] = gpu
    if cls is LoraLoadingError:
        kwargs["lora"] = detail.metadata.get("lora", "")
    if cls is PoolError:
        return PoolError(detail.message)
    error = cls(detail.message, **kwargs)  # type: ignore[arg-type]
    error.details = MappingProxyType(dict(detail.metadata))
    return error


# The reference's names (tests/sdk/test_packaging.py holds them); AuthenticationError is this
# SDK's addition, imported by name.
__all__ = [
    "InputTooLongError",
    "LoraLoadingError",
    "PoolError",
    "ProvisioningError",
    "RequestError",
    "SIEConnectionError",
    "SIEError",
    "ServerError",
    "error_class",
    "error_from_detail",
]
