"""``sie.v1.ExtractService``: the servicer and its converters. The response echoes the model
name the client sent (a ``<name>:<profile>`` variant too); the engine runs under the catalog
name."""

from __future__ import annotations

from sie_sdk.v1 import extract_pb2, extract_pb2_grpc

from sie_server.adapters.base import Extractor
from sie_server.engine.registry import ModelRegistry
from sie_server.grpc_api.convert import (
    Context,
    deadline_of,
    dict_to_struct,
    input_items,
    item_id,
    struct_to_dict,
    timing_pb,
)
from sie_server.grpc_api.errors import translate_errors
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.extract import ExtractedItem, ExtractParams, resolve_extract


class ExtractServicer(extract_pb2_grpc.ExtractServiceServicer):
    def __init__(self, registry: ModelRegistry, limits: RequestLimits) -> None:
        self.registry = registry
        self.limits = limits

    @translate_errors
    async def Extract(
        self, request: extract_pb2.ExtractRequest, context: Context
    ) -> extract_pb2.ExtractResponse:
        ref, cls = self.registry.require_task(request.model, "extract")
        assert issubclass(cls, Extractor)
        spec = ref.spec
        params = request.params
        call = resolve_extract(
            spec,
            input_items(request.items, spec.name),
            ExtractParams(
                labels=list(params.labels),
                output_schema=struct_to_dict(params.output_schema) or None,
                instruction=params.instruction if params.HasField("instruction") else None,
                options=ref.options(struct_to_dict(params.options)),
            ),
            support=cls.extract_support,
            accepted_options=cls.extract_options,
            limits=self.limits,
            deadline=deadline_of(context),
        )
        outcome = await self.registry.extract(spec.name, call)
        return extract_pb2.ExtractResponse(
            model=request.model,
            items=[
                extract_result(item_id(item, index), result)
                for index, (item, result) in enumerate(
                    zip(request.items, outcome.result, strict=True)
                )
            ],
            timing=timing_pb(outcome.timing),
        )


def extract_result(result_id: str, result: ExtractedItem) -> extract_pb2.ExtractResult:
    out = extract_pb2.ExtractResult(
        id=result_id,
        entities=[
            extract_pb2.Entity(
                text=e.text, label=e.label, score=e.score, start=e.start, end=e.end, bbox=e.bbox
            )
            for e in result.entities
        ],
        relations=[
            extract_pb2.Relation(head=r.head, tail=r.tail, relation=r.relation, score=r.score)
            for r in result.relations
        ],
        classifications=[
            extract_pb2.Classification(label=c.label, score=c.score) for c in result.classifications
        ],
        objects=[
            extract_pb2.DetectedObject(label=o.label, score=o.score, bbox=o.bbox)
            for o in result.objects
        ],
    )
    if result.data is not None:
        out.data.CopyFrom(dict_to_struct(dict(result.data)))
    return out
