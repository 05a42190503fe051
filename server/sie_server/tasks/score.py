"""The score task: settings, validation, result types and ranking.

Every item is scored against one query. Rerankers (cross-encoders) score each (query, item) pair
in one forward pass; embedding models score by similarity between the query's and the items'
vectors (``score_mode`` picks which output: ``dense``, ``sparse``, ``colbert`` or ``hybrid``).
The response lists every item exactly once, by score descending (stable for ties), ranked from 0.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sie_server.catalog import ModelSpec
from sie_server.domain import InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks.common import (
    RequestLimits,
    as_limits,
    check_images,
    check_items,
    check_text,
)
from sie_server.tasks.options import Options

#: Option keys every scorer accepts.
SCORE_KEYS = frozenset({"profile", "instruction"})
#: Bi-encoder score modes and the encode output each one needs.
MODE_OUTPUTS: Mapping[str, str] = {"dense": "dense", "sparse": "sparse", "colbert": "multivector"}
HYBRID = "hybrid"
DEFAULT_HYBRID_WEIGHTS: Mapping[str, float] = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}


@dataclass(frozen=True, slots=True)
class ScoreSettings:
    instruction: str | None = None
    #: Adapter options (profile options overlaid with the request's, typed keys removed).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScoreParams:
    instruction: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScoreCall:
    query: InputItem
    items: Sequence[InputItem]
    settings: ScoreSettings
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class RankedScore:
    index: int  # the item's position in the request
    score: float
    rank: int


@dataclass(frozen=True, slots=True)
class ScoreMode:
    """A bi-encoder score mode with the hybrid weights it uses (empty unless hybrid)."""

    name: str
    weights: Mapping[str, float] = field(default_factory=dict)

    @property
    def output_types(self) -> tuple[str, ...]:
        if self.name != HYBRID:
            return (MODE_OUTPUTS[self.name],)
        return tuple(MODE_OUTPUTS[m] for m, w in self.weights.items() if w > 0)


def resolve_score(
    spec: ModelSpec,
    query: InputItem | None,
    items: Sequence[InputItem],
    params: ScoreParams,
    *,
    accepted_options: Collection[str],
    limits: RequestLimits | int,
    deadline: float | None = None,
) -> ScoreCall:
    if query is None or (query.text is None and not query.images and query.multivector is None):
        raise InvalidInput("query is required (an item with text)", model=spec.name)
    check_text(query, 0, spec.name, as_limits(limits), what="query")
    check_images(query, 0, spec.name, as_limits(limits), spec.inputs, what="query")
    check_items(items, spec.name, limits, spec.inputs)
    _, options = Options.resolve(spec, params.options, SCORE_KEYS | set(accepted_options))
    option_instruction = options.optional_text("instruction")
    settings = ScoreSettings(
        instruction=params.instruction or option_instruction or None,
        options=options.without(SCORE_KEYS),
    )
    return ScoreCall(query=query, items=items, settings=settings, deadline=deadline)


def resolve_score_mode(spec: ModelSpec, options: Mapping[str, Any]) -> ScoreMode:
    """The bi-encoder mode from ``score_mode`` / ``score_weights``; the default is the mode of
    the default profile's first output. ``hybrid`` needs two outputs or more."""
    opts = Options(options, spec.name)
    available = [m for m, out in MODE_OUTPUTS.items() if out in spec.outputs]
    modes = [*available, HYBRID] if len(available) > 1 else available
    default_output = next(t for t in (*spec.profile(None).output_types, *spec.outputs))
    default = next((m for m, out in MODE_OUTPUTS.items() if out == default_output), available[0])
    name = opts.choice("score_mode", default, modes)
    weights_raw = opts.mapping("score_weights")
    if name != HYBRID:
        if weights_raw is not None:
            raise InvalidInput(
                "option 'score_weights' applies to score_mode 'hybrid' only", model=spec.name
            )
        return ScoreMode(name)
    # As SIE: the given weights override the defaults (dense .4, sparse .2, colbert .4).
    weights = {m: w for m, w in DEFAULT_HYBRID_WEIGHTS.items() if m in available}
    weights_raw = weights_raw or {}
    for key in weights_raw:
        if key not in available:
            raise InvalidInput(
                f"option 'score_weights' has {key!r}; {spec.name} scores with {', '.join(available)}",
                model=spec.name,
            )
        weights[key] = Options(weights_raw, spec.name).number(key, 0.0, lo=0.0)
    if sum(weights.values()) <= 0:
        raise InvalidInput("option 'score_weights' needs a positive weight", model=spec.name)
    return ScoreMode(name, weights)


def rank(scores: Sequence[float]) -> list[RankedScore]:
    """Items by score descending; ties keep request order (Python's sort is stable)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [RankedScore(index=i, score=float(scores[i]), rank=r) for r, i in enumerate(order)]
