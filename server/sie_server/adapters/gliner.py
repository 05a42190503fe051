"""GLiNER zero-shot NER (``extract`` with labels), through the ``gliner`` package's modular
pipeline: its words splitter, collator, forward pass (``run_batch``) and decoder.

Served models: uni-encoder GLiNER, span level (``urchade/gliner_*-v2.1``, markerV0) or token level
(NuNER Zero style); others (bi-encoder, label decoder, relations, streaming, precomputed prompts)
fail the load with ``ModelLoadFailed``.

Preparing (tokenizer pool). A text is split into words by the model's own words splitter, each
word keeping its character offsets in the original text; an empty or whitespace text gives no
payload and an empty result. Each payload is a window of consecutive words: at most the config's
``max_len`` words, and at most the token limit (the catalog's ``max_sequence_length``, capped by
the tokenizer's) counting the label prompt (``<<ENT>> label ... <<SEP>>``) and special tokens.
Its ``cost`` is that real token count. Consecutive windows share ``min(2 * max_width,
window // 2)`` words, so every span of up to ``max_width`` words lies whole inside some window
when windows are cut by words (a window cut by tokens is shorter and its overlap shrinks with
it). A single word beyond the token budget still makes a window of its own, cut by the
tokenizer and marked ``truncated``.

Batching. The forward pass depends on the labels only (they are in the prompt); the decoding
options (``threshold``, ``flat_ner``, ``multi_label``, ``merge_adjacent_entities``) are applied
per request in postprocessing, so requests with the same labels share batches whatever their
options. The exception is a token-level model with ``represent_spans``, whose forward pass selects
spans by threshold: there the threshold is in the batch key too.

Decoding and stitching (worker pool), per item:

1. Each window's candidates are what GLiNER's decoder finds above the request's threshold
   (span probabilities, or start/end/inside scores for token-level models), before its greedy
   search.
2. A candidate is kept only from its *home* window: among the windows that contain the whole
   span, the one where it has the most context, i.e. the largest distance in words to a cut
   window edge (the text's own start and end are not cuts); ties go to the earlier window. A span
   two windows both see is therefore decided once, by one window: overlap duplicates cannot
   arise, and an entity at a seam is judged with context on both sides.
3. The kept candidates of all windows, at their positions in the whole text, go through GLiNER's
   own greedy search with the request's ``flat_ner`` / ``multi_label``, exactly as candidates of
   one window would: flat NER holds across seams, and a text that fits one window gives what
   ``GLiNER.predict_entities`` gives.
4. Word spans become character offsets in the original text (``text`` is that exact substring).
   Logits leave the model thread as float32, so under bfloat16/float16 the decoder's sigmoid
   runs in float32 (GLiNER itself runs it in the model's dtype).
5. ``merge_adjacent_entities`` (SIE's semantics, for token-level models such as NuNER Zero):
   in start order, an entity with the same label as the previous kept one that starts at most
   one character after its end is merged into it: the union of both spans, the higher score.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sie_server.adapters.base import Extractor, require_texts
from sie_server.adapters.gliner_windows import home_window, merge_adjacent, plan_windows
from sie_server.adapters.hf import parameter_bytes, torch_dtype
from sie_server.domain import InputItem, LoadTarget
from sie_server.errors import InputTooLong, ModelLoadFailed
from sie_server.tasks.extract import Entity, ExtractedItem, ExtractSettings, ExtractSupport
from sie_server.tasks.options import Options

#: The decoding options and their defaults (a catalog profile may override them).
DEFAULT_THRESHOLD = 0.5
DEFAULT_FLAT_NER = True
DEFAULT_MULTI_LABEL = False
DEFAULT_MERGE_ADJACENT = False


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    threshold: float
    flat_ner: bool
    multi_label: bool
    merge_adjacent: bool

    @classmethod
    def read(cls, settings: ExtractSettings, model: str) -> DecodeOptions:
        """Typed option reads: a bad type or value is an InvalidInput naming the key."""
        options = Options(settings.options, model)
        return cls(
            threshold=options.number("threshold", DEFAULT_THRESHOLD, lo=0.0, hi=1.0),
            flat_ner=options.flag("flat_ner", DEFAULT_FLAT_NER),
            multi_label=options.flag("multi_label", DEFAULT_MULTI_LABEL),
            merge_adjacent=options.flag("merge_adjacent_entities", DEFAULT_MERGE_ADJACENT),
        )


@dataclass(frozen=True, slots=True)
class ItemWords:
    """One text's words and their character offsets ``[starts[i], ends[i])`` in it."""

    words: list[str]
    starts: list[int]
    ends: list[int]


@dataclass(frozen=True, slots=True)
class GLiNERWindow:
    """One payload: words ``[start, end)`` of item ``item`` (``text`` holds all its words)."""

    item: int
    start: int
    end: int
    text: ItemWords
    cost: int
    truncated: bool = False

    @property
    def words(self) -> list[str]:
        return self.text.words[self.start : self.end]


@dataclass(frozen=True, slots=True)
class RawWindow:
    """One window's forward-pass outputs on CPU, float32, each with a batch axis of 1."""

    logits: Any
    span_idx: Any = None
    span_mask: Any = None
    span_logits: Any = None


def _keep_every_span(
    spans: list[Any], flat_ner: bool = True, multi_label: bool = False
) -> list[Any]:
    return list(spans)


class GLiNERAdapter(Extractor[GLiNERWindow]):
    """Zero-shot NER with a uni-encoder GLiNER model (see the module docstring)."""

    extract_options: ClassVar[frozenset[str]] = frozenset(
        {"threshold", "flat_ner", "multi_label", "merge_adjacent_entities"}
    )
    extract_support: ClassVar[ExtractSupport] = ExtractSupport(
        labels=True, labels_required=True, output_schema=False
    )

    model: Any = None
    #: The tokenizer the collator uses (prep pool) and a copy for counting tokens (tokenizer
    #: pool): a fast tokenizer's truncation settings are shared state.
    tokenizer: Any = None
    counter: Any = None
    words_splitter: Any = None
    collator: Any = None
    #: GLiNER's decoder, and a copy of it whose greedy search keeps every candidate.
    decoder: Any = None
    candidates: Any = None
    max_words: int = 0
    token_limit: int = 0
    overlap: int = 0
    #: Whether the forward pass depends on the threshold (token level with represent_spans).
    threshold_in_forward: bool = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def load(self, target: LoadTarget) -> None:
        from gliner import GLiNER  # type: ignore[import-untyped]
        from gliner.model import (  # type: ignore[import-untyped]
            UniEncoderSpanGLiNER,
            UniEncoderTokenGLiNER,
        )

        model = GLiNER.from_pretrained(
            target.source,
            load_tokenizer=True,
            map_location=target.device,
            dtype=torch_dtype(target.dtype),
        )
        name = self.spec.name
        if type(model) not in (UniEncoderSpanGLiNER, UniEncoderTokenGLiNER):
            raise ModelLoadFailed(
                f"{name}: adapter 'gliner' serves uni-encoder GLiNER models (span or token "
                f"level), not {type(model).__name__}",
                model=name,
            )
        config = model.config
        if config.precomputed_prompts_mode:
            raise ModelLoadFailed(
                f"{name}: a GLiNER model with precomputed prompts ignores the request's labels",
                model=name,
            )
        tokenizer = model.data_processor.transformer_tokenizer
        if not tokenizer.is_fast:
            raise ModelLoadFailed(f"{name}: GLiNER needs a fast tokenizer", model=name)
        limit = min(self.max_length, int(tokenizer.model_max_length))
        tokenizer.model_max_length = limit  # the collator's truncation stops there
        self.token_limit = limit
        self.tokenizer = tokenizer
        self.counter = copy.deepcopy(tokenizer)
        self.words_splitter = model.data_processor.words_splitter
        self.collator = model.create_collator()
        self.decoder = model.decoder
        self.candidates = copy.copy(model.decoder)
        self.candidates.greedy_search = _keep_every_span
        self.max_words = int(config.max_len)
        self.overlap = min(2 * int(config.max_width), self.max_words // 2)
        self.threshold_in_forward = isinstance(model, UniEncoderTokenGLiNER) and bool(
            config.represent_spans
        )
        self.device = target.device
        self.model = model.eval()

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        self.counter = None
        self.collator = None
        self.decoder = None
        self.candidates = None

    def memory_bytes(self) -> int:
        return 0 if self.model is None else parameter_bytes(self.model)

    # ---- hooks -------------------------------------------------------------------------------
    def extract_key(self, settings: ExtractSettings) -> Hashable:
        if self.threshold_in_forward:
            threshold = DecodeOptions.read(settings, self.spec.name).threshold
            return ("gliner", settings.labels, threshold)
        return ("gliner", settings.labels)

    def prepare_extract(
        self, items: Sequence[InputItem], settings: ExtractSettings
    ) -> list[GLiNERWindow]:
        name = self.spec.name
        texts = require_texts(items, name)
        DecodeOptions.read(settings, name)  # a bad option fails the request here
        prompt = self._prompt_cost(settings.labels)
        budget = self.token_limit - prompt
        if budget <= 0:
            raise InputTooLong(
                f"the {len(settings.labels)} labels take {prompt} tokens of the model's "
                f"{self.token_limit}; no room is left for text",
                model=name,
            )
        split = [self._split(text) for text in texts]
        counts = self._word_token_counts([s.words for s in split])
        payloads: list[GLiNERWindow] = []
        for index, (words, word_counts) in enumerate(zip(split, counts, strict=True)):
            total = len(words.words)
            if not total:
                continue
            for start, end in plan_windows(word_counts, self.max_words, budget, self.overlap):
                tokens = prompt + sum(word_counts[start:end])
                payloads.append(
                    GLiNERWindow(
                        item=index,
                        start=start,
                        end=end,
                        text=words,
                        cost=min(tokens, self.token_limit),
                        truncated=tokens > self.token_limit,
                    )
                )
        return payloads

    def collate_extract(self, payloads: Sequence[GLiNERWindow], settings: ExtractSettings) -> Any:
        import torch

        input_x = [{"tokenized_text": p.words, "ner": None} for p in payloads]
        batch = self.model.collate_batch(input_x, list(settings.labels), collator=self.collator)
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def run_extract(self, inputs: Any, settings: ExtractSettings) -> list[RawWindow]:
        import torch

        threshold = DecodeOptions.read(settings, self.spec.name).threshold
        output = self.model.run_batch(inputs, threshold=threshold, move_to_device=False)

        def rows(value: Any, floating: bool) -> list[Any]:
            if not isinstance(value, torch.Tensor):
                return [None] * len(inputs["tokens"])
            value = value.float() if floating else value
            return list(value.cpu().split(1))

        return [
            RawWindow(logits, span_idx, span_mask, span_logits)
            for logits, span_idx, span_mask, span_logits in zip(
                rows(output.logits, True),
                rows(output.span_idx, False),
                rows(output.span_mask, False),
                rows(output.span_logits, True),
                strict=True,
            )
        ]

    def postprocess_extract(
        self,
        items: Sequence[InputItem],
        payloads: Sequence[GLiNERWindow],
        outputs: Sequence[RawWindow],
        settings: ExtractSettings,
    ) -> list[ExtractedItem]:
        from gliner.data_processing.utils import make_mapping  # type: ignore[import-untyped]

        options = DecodeOptions.read(settings, self.spec.name)
        id_to_class = make_mapping(list(settings.labels))[1]
        windows: list[list[tuple[GLiNERWindow, RawWindow]]] = [[] for _ in items]
        for payload, raw in zip(payloads, outputs, strict=True):
            windows[payload.item].append((payload, raw))
        results: list[ExtractedItem] = []
        for item, item_windows in zip(items, windows, strict=True):
            if not item_windows:
                results.append(ExtractedItem())
                continue
            text = item.text or ""
            entities = self._stitch(text, item_windows, id_to_class, options)
            if options.merge_adjacent:
                entities = merge_adjacent(entities, text)
            results.append(ExtractedItem(entities=entities))
        return results

    # ---- helpers -----------------------------------------------------------------------------
    def _split(self, text: str) -> ItemWords:
        if not text.strip():
            return ItemWords([], [], [])
        words: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        for word, start, end in self.words_splitter(text):
            words.append(word)
            starts.append(int(start))
            ends.append(int(end))
        return ItemWords(words, starts, ends)

    def _prompt_cost(self, labels: Sequence[str]) -> int:
        """Tokens of the label prompt plus the special tokens, as GLiNER's collator builds it."""
        (prompt,), _ = self.model.data_processor.prepare_inputs([[]], list(labels))
        enc = self.counter(prompt, is_split_into_words=True, verbose=False)
        return len(enc["input_ids"])

    def _word_token_counts(self, texts: Sequence[list[str]]) -> list[list[int]]:
        """Per text, the tokens each word takes (words tokenized as GLiNER does: pre-split)."""
        counts: list[list[int]] = [[0] * len(words) for words in texts]
        present = [i for i, words in enumerate(texts) if words]
        if not present:
            return counts
        enc = self.counter(
            [texts[i] for i in present],
            is_split_into_words=True,
            add_special_tokens=False,
            verbose=False,
        )
        for row, i in enumerate(present):
            for word in enc.word_ids(row):
                if word is not None:
                    counts[i][word] += 1
        return counts

    def _stitch(
        self,
        text: str,
        windows: Sequence[tuple[GLiNERWindow, RawWindow]],
        id_to_class: dict[int, str],
        options: DecodeOptions,
    ) -> list[Entity]:
        bounds = [(p.start, p.end) for p, _ in windows]
        words = windows[0][0].text
        total = len(words.words)
        kept: list[Any] = []
        for index, (payload, raw) in enumerate(windows):
            (spans,) = self.candidates.decode(
                [payload.words],
                id_to_class,
                raw.logits,
                span_idx=raw.span_idx,
                span_mask=raw.span_mask,
                span_logits=raw.span_logits,
                threshold=options.threshold,
                flat_ner=options.flat_ner,
                multi_label=options.multi_label,
            )
            for span in spans:
                first, last = span.start + payload.start, span.end + payload.start
                if home_window(bounds, total, first, last) == index:
                    kept.append(dataclasses.replace(span, start=first, end=last))
        chosen = self.decoder.greedy_search(
            kept, flat_ner=options.flat_ner, multi_label=options.multi_label
        )
        entities: list[Entity] = []
        for span in chosen:
            start, end = words.starts[span.start], words.ends[span.end]
            entities.append(
                Entity(
                    text=text[start:end],
                    label=str(span.entity_type),
                    score=float(span.score),
                    start=start,
                    end=end,
                )
            )
        return entities
