"""``sie.v1.ScoreService``: the servicer and its converters. The response echoes the model name
the client sent (a ``<name>:<profile>`` variant too); the engine runs under the catalog name."""

from __future__ import annotations

from sie_sdk.v1 import score_pb2, score_pb2_grpc

from sie_server.adapters.base import Scorer
from sie_server.engine.registry import ModelRegistry
from sie_server.grpc_api.convert import (
    Context,
    deadline_of,
    input_item,
    input_items,
    item_id,
    struct_to_dict,
    timing_pb,
)
from sie_server.grpc_api.errors import translate_errors
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.score import ScoreParams, resolve_score


class ScoreServicer(score_pb2_grpc.ScoreServiceServicer):
    def __init__(self, registry: ModelRegistry, limits: RequestLimits) -> None:
        self.registry = registry
        self.limits = limits

    @translate_errors
    async def Score(
        self, request: score_pb2.ScoreRequest, context: Context
    ) -> score_pb2.ScoreResponse:
        ref, cls = self.registry.require_task(request.model, "score")
        assert issubclass(cls, Scorer)
        spec = ref.spec
        query = (
            input_item(request.query, 0, spec.name, what="query")
            if request.HasField("query")
            else None
        )
        call = resolve_score(
            spec,
            query,
            input_items(request.items, spec.name),
            ScoreParams(
                instruction=request.instruction if request.HasField("instruction") else None,
                options=ref.options(struct_to_dict(request.options)),
            ),
            accepted_options=cls.score_option_keys(),
            limits=self.limits,
            deadline=deadline_of(context),
        )
        outcome = await self.registry.score(spec.name, call)
        return score_pb2.ScoreResponse(
            model=request.model,
            query_id=request.query.id,
            scores=[
                score_pb2.ScoreEntry(
                    item_id=item_id(request.items[entry.index], entry.index),
                    score=entry.score,
                    rank=entry.rank,
                )
                for entry in outcome.result
            ],
            timing=timing_pb(outcome.timing),
        )
