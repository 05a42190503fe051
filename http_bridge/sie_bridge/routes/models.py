"""``GET /v1/models`` and ``GET /v1/models/:model``."""

from __future__ import annotations

from aiohttp import web
from sie_sdk.convert import from_proto as responses
from sie_sdk.v1 import models_pb2

from sie_bridge.negotiate import reply
from sie_bridge.state import UPSTREAM


async def list_models(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    result = await upstream.call(upstream.models.ListModels, models_pb2.ListModelsRequest())
    return reply(request, {"models": [responses.model_info(info) for info in result.models]})


async def get_model(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    result = await upstream.call(
        upstream.models.GetModel, models_pb2.GetModelRequest(name=request.match_info["model"])
    )
    return reply(request, responses.model_info(result.model))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
