"""``POST /v1/encode/:model``, ``/v1/score/:model``, ``/v1/extract/:model``: decode, call, encode.

The model is the rest of the path, so names with ``/`` (``BAAI/bge-m3``) and ``name:profile``
variants pass through to the server unchanged; the server resolves them.
"""

from __future__ import annotations

from aiohttp import web

from sie_bridge import requests, responses
from sie_bridge.negotiate import read_body, reply
from sie_bridge.state import UPSTREAM


def _model(request: web.Request) -> str:
    return request.match_info["model"]


async def encode(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    message = requests.encode_request(_model(request), await read_body(request))
    result = await upstream.call(upstream.encode.Encode, message)
    return reply(
        request, responses.encode_response(result), responses.timing_headers(result.timing)
    )


async def score(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    message = requests.score_request(_model(request), await read_body(request))
    result = await upstream.call(upstream.score.Score, message)
    return reply(request, responses.score_response(result), responses.timing_headers(result.timing))


async def extract(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    message = requests.extract_request(_model(request), await read_body(request))
    result = await upstream.call(upstream.extract.Extract, message)
    return reply(
        request, responses.extract_response(result), responses.timing_headers(result.timing)
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/encode/{model:.+}", encode)
    app.router.add_post("/v1/score/{model:.+}", score)
    app.router.add_post("/v1/extract/{model:.+}", extract)
