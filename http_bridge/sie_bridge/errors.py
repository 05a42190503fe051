"""Errors -> HTTP responses: the bridge's one mapping place.

Everything that goes wrong ends as ``{"detail": {"code", "message", ...}}`` with the status of
the reason's row in ``sie_sdk.reasons.REASONS`` (404 MODEL_NOT_FOUND, 400 INVALID_INPUT, 503 with
``Retry-After`` for MODEL_LOADING / QUEUE_FULL / LORA_LOADING / BACKEND_UNAVAILABLE, 502
MODEL_LOAD_FAILED, 413 REQUEST_TOO_LARGE, 500 INFERENCE_ERROR / INTERNAL_ERROR, 401
UNAUTHENTICATED with ``WWW-Authenticate: Bearer``, ...). The body also carries ``model`` when the
error names one, and the server's ErrorInfo metadata.

Error bodies are always JSON, whatever ``Accept`` says (as in the original SIE server, whose
FastAPI errors are JSON): a person reading curl's output can read them, and the SIE SDK reads
either by ``Content-Type``. Unexpected exceptions are logged with their traceback and answered
500 INTERNAL_ERROR, never with a stack trace in the body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sie_sdk.reasons import ErrorDetail
from sie_sdk.wire import JSON, WireError, dump_json

log = logging.getLogger(__name__)


class BridgeError(Exception):
    """A failed request, carried to the middleware as its transport-neutral detail."""

    def __init__(self, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.detail = detail


def invalid_input(message: str, model: str | None = None) -> BridgeError:
    return BridgeError(ErrorDetail("INVALID_INPUT", message, model=model))


def error_body(detail: ErrorDetail) -> dict[str, Any]:
    body: dict[str, Any] = {"code": detail.reason, "message": detail.message}
    body.update({k: v for k, v in detail.metadata.items() if k not in body})
    if detail.model:
        body["model"] = detail.model
    return {"detail": body}


#: The challenge of a 401 (RFC 6750): the client should send ``Authorization: Bearer <key>``.
WWW_AUTHENTICATE = 'Bearer realm="sie"'


def error_headers(detail: ErrorDetail) -> dict[str, str]:
    """``Retry-After`` when retrying helps, ``WWW-Authenticate`` on a 401."""
    headers = {}
    retry_after = detail.retry_after_header()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if detail.http_status == 401:
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return headers


def error_response(detail: ErrorDetail) -> web.Response:
    return web.Response(
        status=detail.http_status,
        body=dump_json(error_body(detail)),
        content_type=JSON,
        headers=error_headers(detail),
    )


#: aiohttp's own HTTP errors (unknown route, wrong method, body too large) in the same shape.
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BridgeError as exc:
        return error_response(exc.detail)
    except WireError as exc:
        return error_response(ErrorDetail("INVALID_INPUT", str(exc)))
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(
            ErrorDetail(
                "REQUEST_TOO_LARGE",
                f"request body too large: {exc.text} (the limit is --max-body-bytes)",
            )
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(
            exc.status, "INVALID_INPUT" if exc.status < 500 else "INTERNAL_ERROR"
        )
        body = {"detail": {"code": code, "message": exc.reason}}
        return web.Response(
            status=exc.status, body=dump_json(body), content_type=JSON, headers=_allow(exc)
        )
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(ErrorDetail("INTERNAL_ERROR", "internal error in the HTTP bridge"))


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
