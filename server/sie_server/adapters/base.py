"""The adapter contract: a ``ModelAdapter`` (load, unload, memory) plus the capabilities it
implements, declared as types.

* ``Encoder``: dense / sparse / multivector vectors. Every encoder also scores, by similarity
  between the query's and the items' vectors (``Scorer``).
* ``PairScorer``: a reranker that scores each (query, item) pair in one forward pass.
* ``Extractor``: entities, classifications, ... from text and labels.

Each capability has typed hooks, and the engine drives them in fixed places only:

* ``prepare_*`` runs in the tokenizer pool: templates, tokenization (HF fast tokenizers release
  the GIL), windows. Each payload's ``cost`` is its real token count.
* ``collate_*`` runs in the prep pool while the previous batch is on the model: padding, tensors.
* ``run_*`` runs only on the model's own thread, under ``torch.inference_mode``: one raw output
  per payload (float32 arrays, floats).
* ``postprocess_*`` runs in a worker pool once all of a request's payloads ran.

``encode_job`` / ``score_job`` / ``extract_job`` assemble those hooks into a ``Job`` and are the
only entry points the engine calls; a family overrides hooks, not jobs. Payloads share a forward
pass only when their batch key is equal, and a batch runs with the settings of its first
request: a key must therefore hold every setting that changes collate or run (decoding options
that only postprocessing reads do not belong in it).

``load`` happens on the model thread too; heavy imports (torch, transformers) live inside it.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from sie_server.adapters.similarity import score_pair
from sie_server.catalog import CatalogError, ModelSpec
from sie_server.domain import EncodeOutput, InputItem, Job, LoadTarget, WorkGroup
from sie_server.errors import InvalidInput
from sie_server.tasks.common import freeze
from sie_server.tasks.encode import EncodeCall, EncodedItem, EncodeSettings, convert_outputs
from sie_server.tasks.extract import ExtractCall, ExtractedItem, ExtractSettings, ExtractSupport
from sie_server.tasks.score import ScoreCall, ScoreSettings, resolve_score_mode


class Prepared(Protocol):
    """What every payload reports: the tokens it costs and whether its input was cut."""

    @property
    def cost(self) -> int: ...

    @property
    def truncated(self) -> bool: ...


P = TypeVar("P", bound=Prepared)


@dataclass(frozen=True, slots=True)
class BoundRunner:
    """A ``BatchRunner`` made of a family's collate and run hooks bound to one request's settings."""

    collate: Callable[[Sequence[Any]], Any]
    run: Callable[[Any], list[Any]]


def work_group(
    payloads: Sequence[Prepared],
    key: Hashable,
    collate: Callable[[Sequence[Any]], Any],
    run: Callable[[Any], list[Any]],
) -> WorkGroup:
    return WorkGroup(payloads, [p.cost for p in payloads], key, BoundRunner(collate, run))


def require_texts(items: Sequence[InputItem], model: str) -> list[str]:
    """The items' texts; text-only families refuse images and items without text, and token ids
    (a family that decodes them does so before, see ``HFTextAdapter.item_texts``)."""
    texts: list[str] = []
    for index, item in enumerate(items):
        if item.token_ids:
            raise InvalidInput(
                f"item {index}: model {model} does not accept token ids (send text)", model=model
            )
        if item.images:
            raise InvalidInput(f"item {index}: model {model} accepts text only", model=model)
        if item.text is None:
            raise InvalidInput(f"item {index} has no text", model=model)
        texts.append(item.text)
    return texts


class ModelAdapter(ABC):
    """Base of every model family: lifecycle and memory. Capabilities come from mixing in
    ``Encoder``, ``PairScorer`` or ``Extractor``."""

    spec: ModelSpec
    device: str = "cpu"
    #: The forward-pass engines this family runs (``LoadTarget.engine``; catalog ``engine``).
    engines: ClassVar[frozenset[str]] = frozenset({"torch"})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.load_options = spec.load_options
        self.max_length = spec.max_sequence_length

    @abstractmethod
    def load(self, target: LoadTarget) -> None:
        """Load weights and tokenizer from ``target.source`` onto ``target.device``."""

    def concurrent_passes(self) -> bool:
        """Whether two forward passes of this loaded model may run at once, on two threads
        (engine/compute_lane.py): true where a pass only reads the model. Asked before each
        batch; by default no."""
        return False

    def unload(self) -> None:
        """Drop references to weights; the engine empties device caches afterwards."""
        return

    def memory_bytes(self) -> int:
        """Bytes held by parameters and buffers (0 when unknown)."""
        return 0

    def check_spec(self) -> None:
        """Reject a catalog entry this family cannot serve (raise CatalogError)."""
        return


class Scorer(ModelAdapter):
    """Capability: score items against a query (``score`` task)."""

    #: Option keys this family reads when scoring.
    score_options: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def score_option_keys(cls) -> frozenset[str]:
        """Every option key a score request may carry for this family."""
        return cls.score_options

    @abstractmethod
    def score_job(self, call: ScoreCall) -> Job[list[float]]:
        """Prepare the request (tokenizer pool): one score per item, in request order."""


class Encoder(Scorer, Generic[P]):
    """Capability: encode items into vectors (``encode``), and score by vector similarity."""

    #: Output types this family can produce; the catalog lists the subset a model has.
    output_types: ClassVar[frozenset[str]]
    #: Option keys this family reads when encoding (templates, ...).
    encode_options: ClassVar[frozenset[str]] = frozenset()
    score_options = frozenset({"score_mode", "score_weights"})
    #: MaxSim divided by the query's token count (BGE-M3) or not (ColBERT).
    maxsim_mean: ClassVar[bool] = False

    @classmethod
    def score_option_keys(cls) -> frozenset[str]:
        return cls.score_options | cls.encode_options

    def check_spec(self) -> None:
        missing = [t for t in self.spec.embedding_outputs if t not in self.output_types]
        if missing:
            raise CatalogError(
                f"{self.spec.name}: adapter {self.spec.adapter!r} cannot produce {', '.join(missing)}"
            )

    # ---- hooks ------------------------------------------------------------------------------
    @abstractmethod
    def prepare_encode(self, items: Sequence[InputItem], settings: EncodeSettings) -> list[P]:
        """Templates and tokenization (tokenizer pool): one payload per item."""

    @abstractmethod
    def collate_encode(self, payloads: Sequence[P], settings: EncodeSettings) -> Any:
        """Pad a batch into model inputs (prep pool)."""

    @abstractmethod
    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        """Run the model on collated inputs (model thread): one float32 output per payload."""

    def postprocess_encode(
        self, outputs: Sequence[EncodeOutput], payloads: Sequence[P], call: EncodeCall
    ) -> list[EncodedItem]:
        """Convert to the requested dtype (worker pool)."""
        tokens = [(p.cost, p.truncated) for p in payloads]
        return convert_outputs(
            outputs,
            tokens,
            call.settings.output_types,
            call.output_dtype,
            dimensions=call.dimensions,
            muvera=call.muvera,
        )

    def encode_key(self, settings: EncodeSettings) -> Hashable:
        return ("encode", settings.batch_key())

    def modality(self, payload: P) -> str:
        """The tower a payload runs through ("text", "image"). Payloads of different modalities
        never share a forward pass: each modality is its own work group, batched with the same
        modality of other requests. Text-only families never override it."""
        return "text"

    # ---- jobs -------------------------------------------------------------------------------
    def _encode_groups(
        self, payloads: Sequence[P], settings: EncodeSettings
    ) -> tuple[list[WorkGroup], Callable[[Sequence[list[Any]]], list[Any]]]:
        """One work group per modality (text keeps the plain ``encode_key``), and the function
        that puts the groups' outputs back in payload order."""
        kinds = [self.modality(p) for p in payloads]
        positions: dict[str, list[int]] = {}
        for index, kind in enumerate(kinds):
            positions.setdefault(kind, []).append(index)
        base = self.encode_key(settings)
        collate = functools.partial(self.collate_encode, settings=settings)
        run = functools.partial(self.run_encode, settings=settings)
        groups = [
            work_group(
                [payloads[i] for i in where],
                base if kind == "text" else (base, kind),
                collate,
                run,
            )
            for kind, where in positions.items()
        ]
        if len(groups) == 1:
            return groups, lambda outputs: list(outputs[0])

        def merge(outputs: Sequence[list[Any]]) -> list[Any]:
            merged: list[Any] = [None] * len(payloads)
            for where, group_outputs in zip(positions.values(), outputs, strict=True):
                for index, output in zip(where, group_outputs, strict=True):
                    merged[index] = output
            return merged

        return groups, merge

    def encode_job(self, call: EncodeCall) -> Job[list[EncodedItem]]:
        payloads = self.prepare_encode(call.items, call.settings)
        groups, merge = self._encode_groups(payloads, call.settings)

        def finish(outputs: list[list[Any]]) -> list[EncodedItem]:
            return self.postprocess_encode(merge(outputs), payloads, call)

        return Job(groups, finish, tokens=sum(sum(g.costs) for g in groups))

    def score_job(self, call: ScoreCall) -> Job[list[float]]:
        """Bi-encoder scoring: encode the query (``is_query``, with the instruction) and the items,
        then compare them with the mode's similarity. A query given as a multivector is not
        encoded again, and implies ``score_mode: colbert`` unless the request names a mode."""
        given = call.query.multivector
        mode_options = call.settings.options
        if given is not None and "score_mode" not in mode_options:
            mode_options = {**mode_options, "score_mode": "colbert"}
        mode = resolve_score_mode(self.spec, mode_options)
        options = {k: v for k, v in call.settings.options.items() if k not in Encoder.score_options}
        types = mode.output_types
        groups: list[WorkGroup] = []
        merge_query: Callable[[Sequence[list[Any]]], list[Any]] | None = None
        if given is not None:
            self._check_query_multivector(given, types)
        else:
            query_settings = EncodeSettings(
                types, is_query=True, instruction=call.settings.instruction, options=options
            )
            query = self.prepare_encode([call.query], query_settings)
            groups, merge_query = self._encode_groups(query, query_settings)
        query_groups = len(groups)
        doc_settings = EncodeSettings(types, is_query=False, options=options)
        doc_groups, merge_docs = self._encode_groups(
            self.prepare_encode(call.items, doc_settings), doc_settings
        )
        groups += doc_groups
        dense = self.spec.outputs.get("dense")
        dense_similarity = (dense.similarity if dense is not None else None) or "cosine"

        def finish(outputs: list[list[Any]]) -> list[float]:
            query_out: EncodeOutput = (
                EncodeOutput(multivector=given)
                if merge_query is None
                else merge_query(outputs[:query_groups])[0]
            )
            return [
                score_pair(
                    query_out,
                    doc,
                    mode.name,
                    mode.weights,
                    dense_similarity=dense_similarity,
                    maxsim_mean=self.maxsim_mean,
                )
                for doc in merge_docs(outputs[query_groups:])
            ]

        return Job(groups, finish, tokens=sum(sum(g.costs) for g in groups))

    def _check_query_multivector(self, given: Any, types: tuple[str, ...]) -> None:
        name = self.spec.name
        if types != ("multivector",):
            raise InvalidInput(
                "a query given as a multivector scores with score_mode 'colbert' only", model=name
            )
        dims = self.spec.outputs["multivector"].dims
        if given.ndim != 2 or given.shape[0] == 0 or given.shape[1] != dims:
            raise InvalidInput(
                f"query multivector must have shape [tokens, {dims}], got {list(given.shape)}",
                model=name,
            )


class PairScorer(Scorer, Generic[P]):
    """Capability: a reranker scoring (query, item) pairs, each pair one payload, so pairs from
    different requests share forward passes."""

    @abstractmethod
    def prepare_pairs(
        self, query: InputItem, items: Sequence[InputItem], settings: ScoreSettings
    ) -> list[P]:
        """Tokenize each (query, item) pair (tokenizer pool)."""

    @abstractmethod
    def collate_pairs(self, payloads: Sequence[P], settings: ScoreSettings) -> Any:
        """Pad pairs into model inputs (prep pool)."""

    @abstractmethod
    def run_pairs(self, inputs: Any, settings: ScoreSettings) -> list[float]:
        """One relevance score per pair (model thread)."""

    def pair_key(self, settings: ScoreSettings) -> Hashable:
        # The instruction is folded into the query's tokens, so it does not split batches.
        return ("score", freeze(settings.options))

    def score_job(self, call: ScoreCall) -> Job[list[float]]:
        payloads = self.prepare_pairs(call.query, call.items, call.settings)
        group = work_group(
            payloads,
            self.pair_key(call.settings),
            functools.partial(self.collate_pairs, settings=call.settings),
            functools.partial(self.run_pairs, settings=call.settings),
        )

        def finish(outputs: list[list[Any]]) -> list[float]:
            return [float(score) for score in outputs[0]]

        return Job([group], finish, tokens=sum(group.costs))


class Extractor(ModelAdapter, Generic[P]):
    """Capability: extract entities, classifications, ... (``extract`` task)."""

    #: Option keys this family reads when extracting.
    extract_options: ClassVar[frozenset[str]] = frozenset()
    #: Whether the family takes labels (and needs them) or an output schema.
    extract_support: ClassVar[ExtractSupport] = ExtractSupport()

    @abstractmethod
    def prepare_extract(self, items: Sequence[InputItem], settings: ExtractSettings) -> list[P]:
        """Payloads for the items (tokenizer pool); a long item may give several (windows)."""

    @abstractmethod
    def collate_extract(self, payloads: Sequence[P], settings: ExtractSettings) -> Any:
        """Pad payloads into model inputs (prep pool)."""

    @abstractmethod
    def run_extract(self, inputs: Any, settings: ExtractSettings) -> list[Any]:
        """One raw output per payload (model thread)."""

    @abstractmethod
    def postprocess_extract(
        self,
        items: Sequence[InputItem],
        payloads: Sequence[P],
        outputs: Sequence[Any],
        settings: ExtractSettings,
    ) -> list[ExtractedItem]:
        """Decode raw outputs into one result per item (worker pool)."""

    def extract_key(self, settings: ExtractSettings) -> Hashable:
        return ("extract", settings.batch_key())

    def extract_job(self, call: ExtractCall) -> Job[list[ExtractedItem]]:
        payloads = self.prepare_extract(call.items, call.settings)
        group = work_group(
            payloads,
            self.extract_key(call.settings),
            functools.partial(self.collate_extract, settings=call.settings),
            functools.partial(self.run_extract, settings=call.settings),
        )

        def finish(outputs: list[list[Any]]) -> list[ExtractedItem]:
            return self.postprocess_extract(call.items, payloads, outputs[0], call.settings)

        return Job([group], finish, tokens=sum(group.costs))


#: The capability type behind each task.
CAPABILITIES: dict[str, type[Any]] = {
    "encode": Encoder,
    "score": Scorer,
    "extract": Extractor,
}


def tasks_of(cls: type[ModelAdapter]) -> frozenset[str]:
    """The tasks an adapter class can serve, from the capability types it implements."""
    return frozenset(task for task, cap in CAPABILITIES.items() if issubclass(cls, cap))
