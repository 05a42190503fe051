"""``sie.v1.ModelService``: the catalog and each model's state.

ListModels lists the catalog names. GetModel also takes a ``<name>:<profile>`` variant and
describes the catalog model as requests under that name see it: ``name`` is the name sent and
the variant's profile is the default one."""

from __future__ import annotations

from sie_sdk.v1 import models_pb2, models_pb2_grpc

from sie_server.catalog import ModelSpec
from sie_server.catalog.spec import ProfileSpec
from sie_server.engine.registry import ModelEntry, ModelRef, ModelRegistry, ModelState
from sie_server.grpc_api.convert import Context
from sie_server.grpc_api.errors import translate_errors
from sie_server.tasks.encode import profile_outputs

_STATE = {
    ModelState.AVAILABLE: models_pb2.MODEL_STATE_AVAILABLE,
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.LOADED: models_pb2.MODEL_STATE_LOADED,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
    ModelState.UNLOADING: models_pb2.MODEL_STATE_UNLOADING,
}


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @translate_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        device = self.registry.config.placement.device
        return models_pb2.ListModelsResponse(
            models=[model_info(ModelRef(e.spec.name, e), device) for e in self.registry.entries()]
        )

    @translate_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.GetModelResponse:
        ref = self.registry.resolve(request.name)
        return models_pb2.GetModelResponse(
            model=model_info(ref, self.registry.config.placement.device)
        )


def model_info(ref: ModelRef, device: str) -> models_pb2.ModelInfo:
    entry: ModelEntry = ref.entry
    spec = entry.spec
    default = ref.profile or spec.default_profile
    loaded = entry.state is ModelState.LOADED
    return models_pb2.ModelInfo(
        name=ref.name,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        dims={kind: out.dims for kind, out in spec.outputs.items() if out.dims is not None},
        loaded=loaded,
        max_sequence_length=spec.max_sequence_length,
        profiles={
            name: _profile_info(spec, profile, is_default=name == default)
            for name, profile in spec.profiles.items()
        },
        state=_STATE[entry.state],
        device=device if loaded else "",
        error=entry.error or "",
        tasks=list(spec.tasks),
    )


def _profile_info(
    spec: ModelSpec, profile: ProfileSpec, *, is_default: bool
) -> models_pb2.ProfileInfo:
    """The types the profile's responses hold (a MUVERA profile's: its dense FDE, ``dot``)."""
    outputs = profile_outputs(spec, profile)
    return models_pb2.ProfileInfo(
        is_default=is_default,
        output_types=list(outputs),
        output_similarity={t: sim for t, sim in outputs.items() if sim is not None},
    )
