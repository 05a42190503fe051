"""Domain errors -> gRPC statuses, by the one table ``sie_sdk.reasons.REASONS``.

Each error status carries exactly one ``google.rpc.ErrorInfo`` (reason, domain ``sie.v1``,
metadata with the model) in ``grpc-status-details-bin``; retryable ones add
``google.rpc.RetryInfo`` and the ``grpc-retry-pushback-ms`` trailer. Unexpected exceptions are
logged with their traceback and answered INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from sie_sdk.reasons import ERROR_DOMAIN, RETRY_PUSHBACK_KEY, STATUS_DETAILS_KEY, reason

from sie_server.errors import SIEServerError, shortened
from sie_server.observability.metrics import REQUESTS_TOTAL

log = logging.getLogger(__name__)
#: The longest message an error status carries, in characters (a quarter of it when the
#: message is not ASCII, so at most this many bytes): its trailers (the message, percent-encoded,
#: and again inside ``grpc-status-details-bin``) stay far below the 16 KiB clients accept.
MAX_MESSAGE_CHARS = 2000


def status_for(
    error: SIEServerError,
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """(code, message, trailing metadata) for a domain error; the message at most
    ``MAX_MESSAGE_CHARS`` (a safeguard: each error keeps its own short)."""
    code = reason(error.reason).grpc_code
    limit = MAX_MESSAGE_CHARS if error.message.isascii() else MAX_MESSAGE_CHARS // 4
    message = shortened(error.message, limit)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=ERROR_DOMAIN,
        metadata=error.metadata(),
    )
    details = [_pack(info)]
    trailers: list[tuple[str, str | bytes]] = []
    if error.retry_after_s is not None:
        millis = int(error.retry_after_s * 1000)
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(millis)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        trailers.append((RETRY_PUSHBACK_KEY, str(millis)))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    trailers.insert(0, (STATUS_DETAILS_KEY, status.SerializeToString()))
    return code, message, tuple(trailers)


def end_call(context: grpc.aio.ServicerContext[Any, Any], error: SIEServerError) -> None:
    """Set ``error``'s status on the call; the handler then returns (a unary one ``None``, a
    streaming one without another message) and grpc sends the status.

    Not ``context.abort``: its ``AbortError``, caught inside grpc, leaves a reference cycle of
    frames and call state behind every call it ends, which only the cyclic collector frees; a
    refusal is most calls under overload or a flood of unauthenticated ones."""
    code, message, trailers = status_for(error)
    context.set_code(code)
    context.set_details(message)
    context.set_trailing_metadata(trailers)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def translate_errors(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Wrap a unary servicer method: domain errors and surprises end in a status with our
    details (the code, message and trailers set on the context; no response message is sent).

    Every call is counted once in ``sie_requests_total{model, endpoint, status}`` of the
    servicer's ``registry.metrics``: endpoint is the method name in snake case (``Encode`` ->
    ``encode``, ``ListModels`` -> ``list_models``); model is the catalog name of the request's
    ``model`` (``name`` for GetModel; "" for ListModels, and for a name the catalog does not
    resolve, so clients cannot grow the series without bound); status is ``ok``, the error's
    reason, ``CANCELLED`` when the client went away first (or the gRPC code's name when the
    handler aborted by itself).
    """
    endpoint = _snake_case(handler.__name__)

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        def record(status: str) -> None:
            # Before the status goes out: a client that reads the metrics next must find its
            # call counted.
            registry = self.registry
            registry.metrics.inc(
                REQUESTS_TOTAL,
                model=model_label(registry, request),
                endpoint=endpoint,
                status=status,
            )

        try:
            response = await handler(self, request, context)
        except SIEServerError as exc:
            error = exc
        except grpc.aio.AbortError:
            code = context.code()  # the handler aborted by itself
            record(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")
            raise
        except asyncio.CancelledError:
            record("CANCELLED")
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", handler.__qualname__)
            error = SIEServerError(f"internal error: {type(exc).__name__}")
        else:
            record("ok")
            return response
        record(error.reason)
        try:
            end_call(context, error)
        finally:
            # The error's traceback holds this frame, which holds the error: a reference cycle
            # that only the cyclic collector would free (one per refusal, under overload).
            del error
        return None  # type: ignore[return-value]

    return wrapper


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def model_label(registry: Any, request: Any) -> str:
    """The catalog name of the model the request names, "" when none or not in the catalog."""
    name = getattr(request, "model", None)
    if name is None:
        name = getattr(request, "name", "")
    if not isinstance(name, str) or not name:
        return ""
    try:
        spec_name: str = registry.entry(name).spec.name
    except SIEServerError:
        return ""
    return spec_name
