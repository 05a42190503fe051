"""``POST /v1/encode/:model``, ``/v1/score/:model``, ``/v1/extract/:model``: decode, call, encode.

The model is the rest of the path, so names with ``/`` (``BAAI/bge-m3``) and ``name:profile``
variants pass through to the server unchanged; the server resolves them. Each route is the same
three steps with its own request parser, RPC and response builder (``_route``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from sie_sdk.convert import from_proto as responses
from sie_sdk.convert import to_proto as requests
from sie_sdk.v1 import common_pb2

from sie_bridge.negotiate import read_body, reply
from sie_bridge.state import UPSTREAM
from sie_bridge.upstream import Upstream


class _TimedReply(Protocol):
    @property
    def timing(self) -> common_pb2.Timing: ...


RouteHandler = Callable[[web.Request], Awaitable[web.Response]]


def _route(
    parse: Callable[[str, Any], Any],
    method: Callable[[Upstream], Callable[..., Awaitable[Any]]],
    render: Callable[[Any], dict[str, Any]],
) -> RouteHandler:
    async def handle(request: web.Request) -> web.Response:
        upstream = request.app[UPSTREAM]
        message = parse(request.match_info["model"], await read_body(request))
        result: _TimedReply = await upstream.call(method(upstream), message)
        return reply(request, render(result), responses.timing_headers(result.timing))

    return handle


encode = _route(requests.encode_request, lambda u: u.encode.Encode, responses.encode_response)
score = _route(requests.score_request, lambda u: u.score.Score, responses.score_response)
extract = _route(requests.extract_request, lambda u: u.extract.Extract, responses.extract_response)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/encode/{model:.+}", encode)
    app.router.add_post("/v1/score/{model:.+}", score)
    app.router.add_post("/v1/extract/{model:.+}", extract)
