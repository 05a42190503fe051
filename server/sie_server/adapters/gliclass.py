"""GLiClass zero-shot classification (knowledgator/gliclass-*) through the ``gliclass`` package.

One forward pass per text scores every label: the input is the text and a label prompt
(``<<LABEL>>a<<LABEL>>b<<SEP>>`` then the instruction, if any, as the pipeline's task prompt),
text first or labels first as the model's ``config.prompt_first`` says, exactly as
``gliclass.ZeroShotClassificationPipeline`` builds it. The model reads one logit per
``<<LABEL>>`` token; scores are ``softmax`` over the labels (``single-label``, the catalog default
as in SIE) or ``sigmoid`` per label (``multi-label``), computed as the pipeline does. Every label
is returned, sorted by score, minus those under ``threshold`` (default 0.0: all of them).

Context cap (``max_sequence_length``, 512 for gliclass-{small,base,large}-v1.0) and
``overflow_policy``, counted on the tokens of the whole input (special tokens included):
``text`` = tokens of the item's text, ``label_prompt`` = all the others (labels, separators,
instruction, special tokens). When ``text + label_prompt`` exceeds the cap:

* ``error``: ``InputTooLong`` ("Item i: observed N tokens (text=T, label_prompt=L) exceeds
  context cap C for <model>").
* ``truncate_text``: the end of the text is cut to fit; every label is kept. If the label prompt
  alone leaves no room for text, ``InputTooLong``.
* ``default``: what the pipeline does with the input as is. Its tokenizer cuts the end of the
  sequence: on a labels-first model that is the end of the text (same as ``truncate_text``); on a
  text-first model (v1.0) it would cut labels and score labels the model never saw, so the
  input is refused with ``InputTooLong`` (SIE's v1.0 behaviour).

All of it happens in ``prepare_extract``, so a refused item costs no forward pass.

Batching: each row carries its own labels and instruction in its tokens, so payloads share a
forward pass whenever they need the same number of class slots (``max_num_classes``: the label
count for the usual ``max_labels_alloc: dynamic``, a constant otherwise). ``threshold`` and
``classification_type`` only change postprocessing and never split batches. Text pooling other
than ``first`` (``avg``, ``max``, ``last``, ...) reads padded positions in gliclass, so such
models run rows of equal length together, unpadded: results never depend on batch neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sie_server.adapters.base import Extractor, require_texts
from sie_server.adapters.hf import (
    load_pretrained,
    load_tokenizer,
    pad_ids,
    parameter_bytes,
    torch_dtype,
)
from sie_server.catalog import CatalogError
from sie_server.domain import F32, InputItem, LoadTarget
from sie_server.errors import InputTooLong, InvalidInput, ModelLoadFailed
from sie_server.tasks.extract import Classification, ExtractedItem, ExtractSettings, ExtractSupport
from sie_server.tasks.options import Options

if TYPE_CHECKING:
    import torch

LABEL_TOKEN = "<<LABEL>>"
SEP_TOKEN = "<<SEP>>"
CLASSIFICATION_TYPES = ("single-label", "multi-label")
OVERFLOW_POLICIES = ("default", "truncate_text", "error")
#: Text poolings that ignore padded positions (the others run unpadded, in length buckets).
PAD_SAFE_POOLINGS = frozenset({"first", "pass"})
LOAD_OPTION_KEYS = frozenset({"classification_type"})


@dataclass(frozen=True, slots=True)
class ClassifyOptions:
    """The request's options, read and checked (InvalidInput names the key)."""

    threshold: float
    classification_type: str
    overflow_policy: str


@dataclass(slots=True)
class ClassifyPayload:
    """One item's input ids (special tokens included, within the context cap)."""

    input_ids: list[int]
    #: ``max_num_classes`` for the forward pass (None: the model's configured maximum).
    num_classes: int | None
    text_tokens: int
    label_prompt_tokens: int
    truncated: bool = False

    @property
    def cost(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class ClassifyBatch:
    """Collated rows: one (row indices, input_ids, attention_mask) group per forward pass."""

    size: int
    num_classes: int | None
    groups: list[tuple[list[int], Any, Any]]


class GLiClassAdapter(Extractor[ClassifyPayload]):
    """Zero-shot classification with a GLiClass uni-encoder (see the module docstring)."""

    extract_options = frozenset({"threshold", "classification_type", "overflow_policy"})
    extract_support = ExtractSupport(
        labels=True, labels_required=True, output_schema=False, instruction=True
    )
    tokenizer: Any = None
    model: Any = None
    #: True when the model reads labels before the text (``config.prompt_first``).
    prompt_first: bool = False
    #: ``max_num_classes`` policy: "dynamic" (label count), an int, or "fixed" (config maximum).
    labels_alloc: str | int = "dynamic"
    max_num_classes: int = 0
    pad_safe: bool = True
    pad_id: int = 0

    # ---- lifecycle --------------------------------------------------------------------------
    def check_spec(self) -> None:
        name = self.spec.name
        unknown = sorted(set(self.load_options) - LOAD_OPTION_KEYS)
        if unknown:
            raise CatalogError(
                f"{name}: unknown load option {unknown[0]!r} for adapter gliclass "
                f"(known: {', '.join(sorted(LOAD_OPTION_KEYS))})"
            )
        kind = self.load_options.get("classification_type", CLASSIFICATION_TYPES[0])
        if kind not in CLASSIFICATION_TYPES:
            raise CatalogError(
                f"{name}: load_options.classification_type must be one of "
                f"{', '.join(CLASSIFICATION_TYPES)}, got {kind!r}"
            )

    def load(self, target: LoadTarget) -> None:
        from gliclass import (  # type: ignore[import-untyped]
            GLiClassModel,
            GLiClassModelConfig,
        )

        name = self.spec.name
        config = GLiClassModelConfig.from_pretrained(target.source)
        if config.architecture_type != "uni-encoder":
            raise ModelLoadFailed(
                f"{name}: GLiClass architecture {config.architecture_type!r} is not supported "
                "(only uni-encoder)",
                model=name,
            )
        tokenizer = load_tokenizer(target.source)
        if not tokenizer.is_fast:
            raise ModelLoadFailed(f"{name}: a fast tokenizer is required", model=name)
        label_id = tokenizer.convert_tokens_to_ids(LABEL_TOKEN)
        if label_id != config.class_token_index:
            raise ModelLoadFailed(
                f"{name}: the tokenizer maps {LABEL_TOKEN} to {label_id}, the model expects "
                f"class_token_index {config.class_token_index}",
                model=name,
            )
        # from_pretrained's dtype leaves the backbone in float32: cast the whole model.
        model = load_pretrained(GLiClassModel, target, config=config)
        self.model = model.to(dtype=torch_dtype(target.dtype))
        self.tokenizer = tokenizer
        self.device = target.device
        self.prompt_first = bool(config.prompt_first)
        self.labels_alloc = config.max_labels_alloc
        self.max_num_classes = int(config.max_num_classes)
        self.pad_safe = config.pooling_strategy in PAD_SAFE_POOLINGS
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def unload(self) -> None:
        self.model = None

    def memory_bytes(self) -> int:
        return 0 if self.model is None else parameter_bytes(self.model)

    # ---- options ----------------------------------------------------------------------------
    def read_options(self, settings: ExtractSettings) -> ClassifyOptions:
        options = Options(settings.options, self.spec.name)
        default_type = str(self.load_options.get("classification_type", CLASSIFICATION_TYPES[0]))
        return ClassifyOptions(
            threshold=options.number("threshold", 0.0, lo=0.0, hi=1.0),
            classification_type=options.choice(
                "classification_type", default_type, CLASSIFICATION_TYPES
            ),
            overflow_policy=options.choice("overflow_policy", "default", OVERFLOW_POLICIES),
        )

    def num_classes(self, count: int) -> int | None:
        """``max_num_classes`` for ``count`` labels, as the pipeline resolves it; InvalidInput
        when the model has fewer class slots than labels."""
        name = self.spec.name
        if self.labels_alloc == "dynamic":
            return count
        limit = self.labels_alloc if isinstance(self.labels_alloc, int) else self.max_num_classes
        if count > limit:
            raise InvalidInput(
                f"model {name} takes at most {limit} labels, got {count}", model=name
            )
        return limit if isinstance(self.labels_alloc, int) else None

    def extract_key(self, settings: ExtractSettings) -> tuple[object, ...]:
        return ("extract", self.num_classes(len(settings.labels)))

    # ---- hooks ------------------------------------------------------------------------------
    def prepare_extract(
        self, items: Sequence[InputItem], settings: ExtractSettings
    ) -> list[ClassifyPayload]:
        name = self.spec.name
        texts = require_texts(items, name)
        if not settings.labels:
            raise InvalidInput(f"labels are required for {name} (classes)", model=name)
        policy = self.read_options(settings).overflow_policy
        num_classes = self.num_classes(len(settings.labels))
        prompt = "".join(f"{LABEL_TOKEN}{label}" for label in settings.labels) + SEP_TOKEN
        prompt += settings.instruction or ""
        if self.prompt_first:
            inputs = [prompt + text for text in texts]
            spans = [(len(prompt), len(prompt) + len(text)) for text in texts]
        else:
            inputs = [text + prompt for text in texts]
            spans = [(0, len(text)) for text in texts]
        if not inputs:
            return []
        enc = self.tokenizer(
            inputs,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [
            self._fit(index, list(ids), offsets, span, policy, num_classes)
            for index, (ids, offsets, span) in enumerate(
                zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True)
            )
        ]

    def _fit(
        self,
        index: int,
        ids: list[int],
        offsets: Sequence[tuple[int, int]],
        span: tuple[int, int],
        policy: str,
        num_classes: int | None,
    ) -> ClassifyPayload:
        """Count the item's text and label-prompt tokens and apply the overflow policy."""
        start, end = span
        # The text's tokens: the run from the first to the last token whose (non-empty) span
        # starts inside the text; specials have empty spans, labels start outside it.
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and start <= a < end]
        first = inside[0] if inside else 0
        text = inside[-1] - first + 1 if inside else 0
        label_prompt = len(ids) - text
        cap = self.max_length
        payload = ClassifyPayload(ids, num_classes, text, label_prompt)
        if len(ids) <= cap:
            return payload
        refuse = policy == "error" or (policy == "default" and not self.prompt_first)
        if refuse or cap - label_prompt < 1:
            raise InputTooLong(
                f"Item {index}: observed {len(ids)} tokens (text={text}, "
                f"label_prompt={label_prompt}) exceeds context cap {cap} for {self.spec.name}",
                model=self.spec.name,
            )
        keep = cap - label_prompt
        payload.input_ids = ids[: first + keep] + ids[first + text :]
        payload.text_tokens = keep
        payload.truncated = True
        return payload

    def collate_extract(
        self, payloads: Sequence[ClassifyPayload], settings: ExtractSettings
    ) -> ClassifyBatch:
        rows = [p.input_ids for p in payloads]
        if self.pad_safe:
            buckets = [list(range(len(rows)))]
        else:
            by_length: dict[int, list[int]] = defaultdict(list)
            for i, row in enumerate(rows):
                by_length[len(row)].append(i)
            buckets = list(by_length.values())
        groups = [
            (idx, *pad_ids([rows[i] for i in idx], self.pad_id, self.device)) for idx in buckets
        ]
        return ClassifyBatch(len(rows), payloads[0].num_classes, groups)

    def run_extract(self, inputs: ClassifyBatch, settings: ExtractSettings) -> list[F32]:
        """Raw logits per row (float32, on CPU), one per class slot."""
        out: list[F32] = [np.empty(0, dtype=np.float32)] * inputs.size
        for idx, ids, mask in inputs.groups:
            logits: torch.Tensor = self.model(
                input_ids=ids, attention_mask=mask, max_num_classes=inputs.num_classes
            ).logits
            for i, row in zip(idx, logits.detach().float().cpu().numpy(), strict=True):
                out[i] = np.ascontiguousarray(row)
        return out

    def postprocess_extract(
        self,
        items: Sequence[InputItem],
        payloads: Sequence[ClassifyPayload],
        outputs: Sequence[F32],
        settings: ExtractSettings,
    ) -> list[ExtractedItem]:
        options = self.read_options(settings)
        return [
            ExtractedItem(classifications=classify(row, settings.labels, options))
            for row in outputs
        ]


def classify(logits: F32, labels: Sequence[str], options: ClassifyOptions) -> list[Classification]:
    """Scores as the pipeline's ``_postprocess_logits`` computes them (softmax over the labels
    or sigmoid per label), sorted by score, at or above the threshold."""
    import torch

    row = torch.from_numpy(np.asarray(logits[: len(labels)], dtype=np.float32))
    if options.classification_type == "single-label":
        scores: list[float] = torch.softmax(row, dim=-1).tolist()
    else:
        scores = torch.sigmoid(row).tolist()
    found = [
        Classification(label, score)
        for label, score in zip(labels, scores, strict=True)
        if score >= options.threshold
    ]
    return sorted(found, key=lambda c: c.score, reverse=True)
