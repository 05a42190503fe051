"""The extract task: settings, validation and result types.

Extractors take ``labels`` (entity types or classes) and/or an ``output_schema``; a model that
cannot use what the request asks for answers ``InvalidInput`` rather than an empty success. Every
result carries all its lists (entities, relations, classifications, objects), empty when none.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sie_server.catalog import ModelSpec
from sie_server.domain import InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks.common import RequestLimits, as_limits, check_items, freeze
from sie_server.tasks.options import Options

#: Option keys every extractor accepts.
EXTRACT_KEYS = frozenset({"profile", "instruction"})


@dataclass(frozen=True, slots=True)
class ExtractSettings:
    labels: tuple[str, ...] = ()
    output_schema: Mapping[str, Any] | None = None
    instruction: str | None = None
    #: Adapter options (profile options overlaid with the request's, typed keys removed).
    options: Mapping[str, Any] = field(default_factory=dict)

    def batch_key(self) -> tuple[object, ...]:
        return (self.labels, freeze(self.output_schema), self.instruction, freeze(self.options))


@dataclass(frozen=True, slots=True)
class ExtractParams:
    labels: Sequence[str] = ()
    output_schema: Mapping[str, Any] | None = None
    instruction: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExtractCall:
    items: Sequence[InputItem]
    settings: ExtractSettings
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class ExtractSupport:
    """What an extractor family can use; the request is checked against it."""

    labels: bool = True
    labels_required: bool = True
    output_schema: bool = False
    #: Whether the family feeds ``instruction`` to the model (else it is refused, not ignored).
    instruction: bool = False


@dataclass(frozen=True, slots=True)
class Entity:
    text: str
    label: str
    score: float
    start: int | None = None  # character offsets into the item's text
    end: int | None = None
    bbox: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Relation:
    head: str
    tail: str
    relation: str
    score: float


@dataclass(frozen=True, slots=True)
class Classification:
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class DetectedObject:
    label: str
    score: float
    bbox: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ExtractedItem:
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    classifications: list[Classification] = field(default_factory=list)
    objects: list[DetectedObject] = field(default_factory=list)
    data: Mapping[str, Any] | None = None


def resolve_extract(
    spec: ModelSpec,
    items: Sequence[InputItem],
    params: ExtractParams,
    *,
    support: ExtractSupport,
    accepted_options: Collection[str],
    limits: RequestLimits | int,
    deadline: float | None = None,
) -> ExtractCall:
    check_items(items, spec.name, limits, spec.inputs)
    labels = _labels(params.labels, spec.name)
    limit = as_limits(limits).max_labels
    if len(labels) > limit:
        raise InvalidInput(
            f"{len(labels)} labels exceed the limit of {limit} per request (--max-labels)",
            model=spec.name,
        )
    if labels and not support.labels:
        raise InvalidInput(f"model {spec.name} does not take labels", model=spec.name)
    if not labels and support.labels_required:
        raise InvalidInput(
            f"labels are required for {spec.name} (entity types or classes)", model=spec.name
        )
    if params.output_schema and not support.output_schema:
        raise InvalidInput(
            f"model {spec.name} cannot fill an output_schema; it extracts with labels",
            model=spec.name,
        )
    _, options = Options.resolve(spec, params.options, EXTRACT_KEYS | set(accepted_options))
    instruction = params.instruction or options.optional_text("instruction") or None
    if instruction and not support.instruction:
        raise InvalidInput(f"model {spec.name} does not take an instruction", model=spec.name)
    settings = ExtractSettings(
        labels=labels,
        output_schema=params.output_schema or None,
        instruction=instruction,
        options=options.without(EXTRACT_KEYS),
    )
    return ExtractCall(items=items, settings=settings, deadline=deadline)


def _labels(raw: Sequence[str], model: str) -> tuple[str, ...]:
    for index, label in enumerate(raw):
        if not label.strip():
            raise InvalidInput(f"label {index} is empty", model=model)
    return tuple(dict.fromkeys(raw))
