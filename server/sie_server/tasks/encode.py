"""The encode task: settings, validation, result types and output conversion.

``resolve_encode`` turns transport-neutral parameters into an ``EncodeCall`` or raises
``InvalidInput``. The typed parameters (``output_types``, ``output_dtype``, ``is_query``,
``instruction``, ``dimensions``) may also arrive inside ``options`` (the published SIE SDK sends
``is_query`` there); a typed field that is set wins over the same key in options, which wins over
the profile.

``dimensions`` (OpenAI's ``dimensions``) keeps the first N dims of each dense vector and
L2-renormalizes them, in postprocessing, before the output dtype conversion. It is a no-op when N
equals the model's dims (any model); otherwise the model's dense output must be ``truncatable``
(Matryoshka) and 1 <= N < dims. The call carries ``dimensions`` only when it truncates; it never
enters the batch key (the forward pass is the same).

``muvera`` (a mapping: ``k_sim``, ``dim_proj``, ``r_reps``, ``final_dim``, ``seed``; see
``tasks/muvera.py``) on a model with a multivector output makes the response's ``dense`` vector
the MUVERA FDE of the multivector, the query or the document variant by ``is_query``. The model
runs as for a multivector request (the forward pass and so the batch key are the same: ``dense``
becomes ``multivector`` in ``settings.output_types``) and the FDE is computed in postprocessing.
The response holds the FDE, plus whatever else the request names in ``output_types``
(``multivector``: the vectors the FDE came from); a profile's output types give the FDE alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from sie_server.catalog import ModelSpec
from sie_server.catalog.spec import OUTPUT_TYPES, ProfileSpec
from sie_server.domain import EncodeOutput, InputItem
from sie_server.errors import InvalidInput, ResponseTooLarge, SIEServerError
from sie_server.tasks.common import RequestLimits, check_items, freeze
from sie_server.tasks.muvera import MuveraParams, encode_fde, parse_muvera
from sie_server.tasks.options import Options
from sie_server.tasks.output_dtype import OUTPUT_DTYPES, convert, sparse_dtype

#: Option keys every encoder accepts: the profile, the typed parameters and ``muvera`` (which
#: ``resolve_encode`` refuses on models without a multivector output).
ENCODE_KEYS = frozenset(
    {"profile", "output_types", "output_dtype", "is_query", "instruction", "dimensions", "muvera"}
)
#: Option keys of models that format text with templates.
TEMPLATE_KEYS = frozenset({"query_template", "document_template", "instruction_template"})


@dataclass(frozen=True, slots=True)
class EncodeSettings:
    """Per-request encode settings after profile resolution. Items share a forward pass only
    when their ``batch_key`` is equal."""

    output_types: tuple[str, ...]
    is_query: bool = False
    instruction: str | None = None
    #: Adapter options (profile options overlaid with the request's, typed keys removed).
    options: Mapping[str, Any] = field(default_factory=dict)

    def batch_key(self) -> tuple[object, ...]:
        # The instruction is folded into the tokens already, so it does not split batches.
        return (self.output_types, self.is_query, freeze(self.options))


@dataclass(frozen=True, slots=True)
class EncodeParams:
    """Encode parameters as a transport delivers them (unset typed fields are None)."""

    output_types: Sequence[str] = ()
    output_dtype: str | None = None
    is_query: bool | None = None
    instruction: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Keep the first N dense dims (renormalized); None: unset.
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class MuveraOutput:
    """MUVERA on an encode call: the response's dense vector is the FDE of the model's
    multivector, computed in postprocessing."""

    params: MuveraParams
    is_query: bool
    #: The request asked for the multivector too.
    keep_multivector: bool

    def output_types(self, computed: Sequence[str]) -> tuple[str, ...]:
        """The response's types, from the ones the model computes (which hold no dense)."""
        kept = {"dense", *(t for t in computed if t != "multivector" or self.keep_multivector)}
        return tuple(t for t in OUTPUT_TYPES if t in kept)

    def apply(self, out: EncodeOutput) -> EncodeOutput:
        """``out`` with the FDE of its multivector as its dense vector."""
        if out.multivector is None:
            raise SIEServerError("adapter produced no multivector output for muvera")
        fde = encode_fde(out.multivector, self.params, is_query=self.is_query)
        kept = out.multivector if self.keep_multivector else None
        return EncodeOutput(dense=fde, sparse=out.sparse, multivector=kept)


@dataclass(frozen=True, slots=True)
class EncodeCall:
    """One validated encode request."""

    items: Sequence[InputItem]
    settings: EncodeSettings
    output_dtype: str = "float32"
    deadline: float | None = None  # time.monotonic() seconds
    #: Cut dense vectors to their first N dims and renormalize; None: full vectors.
    dimensions: int | None = None
    #: The dense output is the MUVERA FDE of the multivector; None: no MUVERA.
    muvera: MuveraOutput | None = None

    @property
    def output_types(self) -> tuple[str, ...]:
        """The types the response holds (``settings.output_types`` is what the model runs)."""
        types = self.settings.output_types
        return types if self.muvera is None else self.muvera.output_types(types)

    @property
    def dense_dims(self) -> int | None:
        """The response's dense dims where they are not the model's: the FDE's, or the
        truncated ``dimensions``; None for the model's full dense vectors."""
        return self.muvera.params.dims if self.muvera is not None else self.dimensions


#: Bytes per value of each output dtype on the wire (binary packs eight values a byte).
_VALUE_BYTES = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "uint8": 1.0, "binary": 0.125}
#: Per item: ids, dims, tensor headers, num_tokens.
_ITEM_OVERHEAD = 96


def response_bytes(call: EncodeCall, spec: ModelSpec, tokens: int) -> int:
    """An upper estimate of the response's size for ``tokens`` tokens in all: dense vectors per
    item, and sparse entries and multivector rows per token."""
    value = _VALUE_BYTES[call.output_dtype]
    size = _ITEM_OVERHEAD * len(call.items)
    for kind in call.output_types:
        if kind == "dense":
            dims = call.dense_dims or spec.outputs["dense"].dims or 0
            size += int(len(call.items) * dims * value)
        elif kind == "sparse":
            size += tokens * (4 + int(_VALUE_BYTES[sparse_dtype(call.output_dtype)]))
        elif kind == "multivector":
            size += int(tokens * (spec.outputs[kind].dims or 0) * value)
    return size


def check_response_size(call: EncodeCall, spec: ModelSpec, tokens: int, limit: int) -> None:
    """Refuse, before any compute, a request whose response could not be sent."""
    size = response_bytes(call, spec, tokens)
    if size > limit:
        # Fewer than the request's items, since they are over the limit together; 1 when one
        # item alone is (splitting cannot help then).
        per_item = max(1, size // max(1, len(call.items)))
        fit = max(1, min(len(call.items) - 1, limit // per_item))
        raise ResponseTooLarge(
            f"the response would be about {size / 2**20:.1f} MiB, over the message limit of "
            f"{limit / 2**20:.1f} MiB (--max-message-bytes); split the request (about "
            f"{fit} items like these fit)",
            model=spec.name,
            items_that_fit=fit,
        )


@dataclass(frozen=True, slots=True)
class SparseResult:
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.generic]
    dtype: str


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """One item's outputs in the requested dtype, with the tokens the model saw."""

    num_tokens: int
    truncated: bool
    dense: npt.NDArray[np.generic] | None = None
    sparse: SparseResult | None = None
    multivector: npt.NDArray[np.generic] | None = None


# ---- validation --------------------------------------------------------------------------------
def resolve_encode(
    spec: ModelSpec,
    items: Sequence[InputItem],
    params: EncodeParams,
    *,
    accepted_options: Collection[str],
    limits: RequestLimits | int,
    deadline: float | None = None,
) -> EncodeCall:
    """Merge the profile with the request; reject what the model cannot do (InvalidInput)."""
    check_items(items, spec.name, limits, spec.inputs)
    profile, options = Options.resolve(spec, params.options, ENCODE_KEYS | set(accepted_options))
    # Typed fields win over options, options over the profile; option values are always checked.
    option_types = options.text_list("output_types")
    option_dtype = options.optional_text("output_dtype")
    option_is_query = options.optional_flag("is_query")
    option_instruction = options.optional_text("instruction")
    asked = tuple(dict.fromkeys(params.output_types or option_types or ()))
    is_query = bool(params.is_query if params.is_query is not None else option_is_query)
    requested = params.dimensions is not None or "dimensions" in params.options
    muvera = resolve_muvera(spec, options, asked, is_query=is_query, dimensions=requested)
    if muvera is None:
        types = _output_types(spec, asked or [t for t in profile.output_types if t in OUTPUT_TYPES])
    else:
        types = _muvera_output_types(spec, asked)
    dtype = params.output_dtype or option_dtype or "float32"
    if dtype not in OUTPUT_DTYPES:
        raise InvalidInput(
            f"unknown output_dtype {dtype!r} (known: {', '.join(OUTPUT_DTYPES)})", model=spec.name
        )
    instruction = params.instruction or option_instruction or None
    dimensions = params.dimensions
    if dimensions is None:
        dimensions = _option_dimensions(options)
    settings = EncodeSettings(
        output_types=types,
        is_query=is_query,
        instruction=instruction,
        options=options.without(ENCODE_KEYS),
    )
    return EncodeCall(
        items=items,
        settings=settings,
        output_dtype=dtype,
        deadline=deadline,
        dimensions=resolve_dimensions(spec, dimensions, types, requested=requested),
        muvera=muvera,
    )


def _output_types(spec: ModelSpec, types: Sequence[str]) -> tuple[str, ...]:
    """The output types asked (or the profile's), checked, in one canonical order: [dense,
    sparse] and [sparse, dense] share a forward pass."""
    unknown = [t for t in types if t not in OUTPUT_TYPES]
    if unknown:
        raise InvalidInput(
            f"unknown output type(s) {', '.join(map(repr, unknown))} (known: {', '.join(OUTPUT_TYPES)})",
            model=spec.name,
        )
    missing = [t for t in types if t not in spec.outputs]
    if missing or not types:
        produced = ", ".join(spec.embedding_outputs) or "no embeddings"
        raise InvalidInput(
            f"model {spec.name} does not produce {', '.join(missing) or 'embeddings'} (it produces {produced})",
            model=spec.name,
        )
    return tuple(t for t in OUTPUT_TYPES if t in types)


def profile_outputs(spec: ModelSpec, profile: ProfileSpec) -> dict[str, str | None]:
    """What an encode call with ``profile`` and nothing else asked returns, each type with its
    similarity: the profile's types as the model declares them, or with MUVERA (the profile's
    ``muvera`` option set) the FDE alone, a dense vector compared by dot product (the
    encoding approximates MaxSim by an inner product, as ``resolve_encode`` builds it)."""
    if profile.options.get("muvera") is not None and "multivector" in spec.outputs:
        return {"dense": "dot"}
    return {t: spec.outputs[t].similarity for t in profile.output_types if t in spec.outputs}


def _muvera_output_types(spec: ModelSpec, asked: Sequence[str]) -> tuple[str, ...]:
    """What the model computes for a MUVERA request: its multivector (the FDE's source) in place
    of dense, and the other types asked."""
    others = [t for t in asked if t != "dense"]
    return _output_types(spec, [*others, "multivector"])


def resolve_muvera(
    spec: ModelSpec, options: Options, asked: Sequence[str], *, is_query: bool, dimensions: bool
) -> MuveraOutput | None:
    """The ``muvera`` option (None when absent or null), checked against the model: it needs a
    multivector output, and ``dimensions`` (requested, not from the profile) does not apply."""
    value = options.mapping("muvera")
    if value is None:
        return None
    name = spec.name
    multivector = spec.outputs.get("multivector")
    if multivector is None:
        produced = ", ".join(spec.embedding_outputs) or "no embeddings"
        raise InvalidInput(
            f"option 'muvera' encodes multivectors; model {name} has none (it produces {produced})",
            model=name,
        )
    if dimensions:
        raise InvalidInput(
            "dimensions does not apply to a MUVERA encoding; set muvera.final_dim instead",
            model=name,
        )
    params = parse_muvera(value, multivector.dims or 0, name)
    return MuveraOutput(params, is_query=is_query, keep_multivector="multivector" in asked)


def _option_dimensions(options: Options) -> int | None:
    """``options["dimensions"]``: an integer (a Struct carries numbers as doubles: 256.0 is 256)."""
    value = options.values.get("dimensions")
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f"{type(value).__name__} {value!r}"
        raise InvalidInput(
            f"option 'dimensions' must be an integer, got {shown}", model=options.model
        )
    return value


def resolve_dimensions(
    spec: ModelSpec, dimensions: int | None, types: Sequence[str], *, requested: bool = True
) -> int | None:
    """The dense dims to keep, or None for full vectors (InvalidInput when the model cannot).

    ``requested``: the request set it (not only the profile); a profile's ``dimensions`` is
    ignored by a request that asks for no dense output, a request's is refused."""
    if dimensions is None:
        return None
    name = spec.name
    dense = spec.outputs.get("dense")
    if dense is None or "dense" not in types:
        if not requested:
            return None
        raise InvalidInput(
            f"dimensions applies to dense vectors; this request asks for {', '.join(types)} "
            f"of model {name}",
            model=name,
        )
    full = dense.dims or 0
    if dimensions == full:
        return None
    if not 1 <= dimensions <= full:
        raise InvalidInput(
            f"dimensions must be between 1 and {full} for model {name}, got {dimensions}",
            model=name,
        )
    if not dense.truncatable:
        raise InvalidInput(
            f"model {name} does not support dimensions={dimensions}: its dense vectors are not "
            f"truncatable (not a Matryoshka model); only its full {full} dims are served",
            model=name,
        )
    return dimensions


def format_text(text: str, settings: EncodeSettings) -> str:
    """Apply instruction and query/document templates from the options.

    ``instruction_template`` (default ``"{instruction} {text}"``) wins when an instruction is
    given; else ``query_template`` or ``document_template`` per ``is_query``. Templates were
    checked when the call was resolved.
    """
    opts = settings.options
    if settings.instruction:
        template = str(opts.get("instruction_template") or "{instruction} {text}")
        return template.format(instruction=settings.instruction, text=text)
    side = opts.get("query_template" if settings.is_query else "document_template")
    return str(side).format(text=text) if side else text


# ---- postprocessing ----------------------------------------------------------------------------
def convert_outputs(
    outputs: Sequence[EncodeOutput],
    tokens: Sequence[tuple[int, bool]],
    types: Sequence[str],
    dtype: str,
    *,
    dimensions: int | None = None,
    muvera: MuveraOutput | None = None,
) -> list[EncodedItem]:
    """Adapter outputs (float32) to results in ``dtype``; ``tokens`` is (num_tokens, truncated).
    Dense vectors are cut to ``dimensions`` and renormalized first (None: full vectors). With
    ``muvera``, ``types`` are the ones the model computed, and the dense vector is the FDE of
    each multivector."""
    if muvera is not None:
        outputs = [muvera.apply(out) for out in outputs]
        types = muvera.output_types(types)
    return [
        _convert(out, count, truncated, types, dtype, dimensions)
        for out, (count, truncated) in zip(outputs, tokens, strict=True)
    ]


def truncate_dense(vector: npt.NDArray[np.float32], dimensions: int) -> npt.NDArray[np.float32]:
    """The first ``dimensions`` values, L2-normalized (a zero vector stays zero)."""
    head = np.asarray(vector[:dimensions], dtype=np.float32)
    norm = float(np.linalg.norm(head))
    return head / np.float32(norm) if norm > 0 else head.copy()


def _convert(
    out: EncodeOutput,
    num_tokens: int,
    truncated: bool,
    types: Sequence[str],
    dtype: str,
    dimensions: int | None,
) -> EncodedItem:
    def need(kind: str, value: Any) -> Any:
        if kind in types and value is None:
            raise SIEServerError(f"adapter produced no {kind} output")
        return value if kind in types else None

    dense = need("dense", out.dense)
    if dense is not None and dimensions is not None:
        dense = truncate_dense(dense, dimensions)
    sparse = need("sparse", out.sparse)
    multivector = need("multivector", out.multivector)
    sparse_kind = sparse_dtype(dtype)
    return EncodedItem(
        num_tokens=num_tokens,
        truncated=truncated,
        dense=convert(dense, dtype) if dense is not None else None,
        sparse=SparseResult(sparse.indices, convert(sparse.values, sparse_kind), sparse_kind)
        if sparse is not None
        else None,
        multivector=convert(multivector, dtype) if multivector is not None else None,
    )
