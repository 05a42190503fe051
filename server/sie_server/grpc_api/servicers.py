"""Thin servicers: convert the request, await the engine, convert the response."""

from __future__ import annotations

from typing import Any

import grpc
from sie_sdk.v1 import (
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2,
    extract_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

from sie_server.config import Settings
from sie_server.engine.registry import ModelRegistry
from sie_server.grpc_api import convert
from sie_server.grpc_api.errors import translate_errors

Context = grpc.aio.ServicerContext[Any, Any]


class EncodeServicer(encode_pb2_grpc.EncodeServiceServicer):
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    @translate_errors
    async def Encode(
        self, request: encode_pb2.EncodeRequest, context: Context
    ) -> encode_pb2.EncodeResponse:
        spec = self.registry.require_task(request.model, "encode")
        call = convert.encode_call(
            request, spec, self.settings.max_items_per_request, convert.deadline_of(context)
        )
        outcome = await self.registry.encode(request.model, call)
        return convert.encode_response(request.model, request, outcome, spec)


class ScoreServicer(score_pb2_grpc.ScoreServiceServicer):
    """Reranking arrives with the cross-encoder adapters; until then every catalogued model
    answers INVALID_INPUT (no adapter family serves "score") and unknown ones MODEL_NOT_FOUND."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @translate_errors
    async def Score(
        self, request: score_pb2.ScoreRequest, context: Context
    ) -> score_pb2.ScoreResponse:
        self.registry.require_task(request.model, "score")
        raise AssertionError("no adapter family serves score yet")


class ExtractServicer(extract_pb2_grpc.ExtractServiceServicer):
    """Extraction arrives with the GLiNER/classifier adapters (see ScoreServicer)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @translate_errors
    async def Extract(
        self, request: extract_pb2.ExtractRequest, context: Context
    ) -> extract_pb2.ExtractResponse:
        self.registry.require_task(request.model, "extract")
        raise AssertionError("no adapter family serves extract yet")


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @translate_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        device = self.registry.config.placement.device
        return models_pb2.ListModelsResponse(
            models=[convert.model_info(entry, device) for entry in self.registry.entries()]
        )

    @translate_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.GetModelResponse:
        entry = self.registry.entry(request.name)
        return models_pb2.GetModelResponse(
            model=convert.model_info(entry, self.registry.config.placement.device)
        )
