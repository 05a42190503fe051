"""``RequireApiKey``: the server interceptor that checks API keys on every call.

A call must carry ``authorization: Bearer <key>`` metadata with one of the configured keys
(``sie_sdk.api_keys.ApiKeys``: ``--api-keys`` / ``SIE_API_KEYS`` and ``--api-keys-file``, reloaded
when the file changes). Without a key, or with a wrong one, it is answered ``UNAUTHENTICATED``
with our ``ErrorInfo`` (reason ``UNAUTHENTICATED``) before the servicer runs and before its
request is parsed. The standard health service and reflection stay open: load balancers and
Kubernetes probe health without credentials, and reflection only describes the public contract.

The interceptor only runs when keys are configured (``create_server`` leaves it out otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from sie_sdk.api_keys import AUTHORIZATION, ApiKeys

from sie_server.errors import Unauthenticated
from sie_server.grpc_api.errors import end_call

Context = grpc.aio.ServicerContext[Any, Any]
#: grpc's stubs type method handlers for the blocking server; the aio ones hold coroutines.
Handler = Any

#: Services callable without a key (method names are ``/<service>/<method>``).
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
MISSING = "this server requires an API key: send 'authorization: Bearer <key>' metadata"
WRONG = "the API key is not valid on this server"


def is_open(method: str) -> bool:
    """Whether ``method`` (``/package.Service/Method``) is callable without a key."""
    return method.lstrip("/").partition("/")[0] in OPEN_SERVICES


def _authorization(details: grpc.HandlerCallDetails) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == AUTHORIZATION and isinstance(value, str):
            return value
    return None


def _refuse(context: Context, message: str) -> None:
    end_call(context, Unauthenticated(message))


def _ignore(data: bytes) -> None:
    """The refused call's request is never parsed."""


def _refusal(handler: Handler, message: str) -> Handler:
    """A handler of ``handler``'s kind (unary or streaming, each way) that only refuses."""

    async def unary_response(request: Any, context: Context) -> Any:
        _refuse(context, message)

    async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
        _refuse(context, message)
        return
        yield  # pragma: no cover - never sent; the yield makes it a stream handler

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response, _ignore, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response, _ignore, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response, _ignore, serializer)
    return grpc.stream_stream_rpc_method_handler(stream_response, _ignore, serializer)


class RequireApiKey(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        authorization = _authorization(handler_call_details)
        if self.keys.allows_header(authorization):
            return handler
        return _refusal(handler, WRONG if authorization else MISSING)
