"""API keys at the bridge: ``auth_middleware`` checks the client's key (when the bridge has keys)
and hands its ``Authorization`` header to the backend calls of the request.

Two places can hold keys (docs/security.md):

* the server (``SIE_API_KEYS``): the bridge forwards each client's ``Authorization`` header as
  gRPC metadata, so one key list, on the server, serves gRPC and HTTP clients alike, and a wrong
  key comes back as the server's ``UNAUTHENTICATED``, a 401 here;
* the bridge (``SIE_BRIDGE_API_KEYS`` / ``--api-keys-file``): refused at the door, before the body
  is read, with no backend call. With ``--backend-api-key`` the bridge then talks to the server
  with its own key instead of forwarding the client's (the bridge is the server's only client).

Open whatever the keys: ``/healthz``, ``/readyz``, ``/metrics`` (probes and scrapers carry no
credentials), ``/openapi.json`` (the public contract), the status page ``/`` and its socket
``/ws/status``: a browser cannot put an ``Authorization`` header on a WebSocket, and the socket
shows what ``/metrics`` already shows. The bridge reads the server's status for them with its
backend key, so a server with keys needs ``--backend-api-key`` for the server's series to appear.

A refusal is ``401 {"detail": {"code": "UNAUTHENTICATED", "message"}}`` with
``WWW-Authenticate: Bearer`` (``sie_bridge.errors``).
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from sie_sdk.api_keys import ApiKeys
from sie_sdk.reasons import ErrorDetail

from sie_bridge.errors import BridgeError, Handler
from sie_bridge.upstream import CLIENT_AUTHORIZATION

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/ws/status"})
MISSING = "this endpoint requires an API key: send 'Authorization: Bearer <key>'"
WRONG = "the API key is not valid on this bridge"


def auth_middleware(keys: ApiKeys) -> Middleware:
    """Refuse requests without a valid key (when ``keys`` are configured) outside
    ``OPEN_PATHS``; forward the client's ``Authorization`` header to the backend calls."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        if request.path not in OPEN_PATHS and not keys.allows_header(authorization):
            message = WRONG if authorization else MISSING
            raise BridgeError(ErrorDetail("UNAUTHENTICATED", message))
        token = CLIENT_AUTHORIZATION.set(authorization)
        try:
            return await handler(request)
        finally:
            CLIENT_AUTHORIZATION.reset(token)

    return middleware
