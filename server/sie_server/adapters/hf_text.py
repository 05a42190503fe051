"""The Hugging Face text base: what every transformers text family shares (tokenizer and model
loading, unloading, memory, tokenizing with truncation, right-pad collation), so that a family
keeps only what differs: its Auto class, its load-time extras and its forward pass.

* ``HFTextAdapter``: one tokenizer, one model, texts to padded ids; items sent as token ids are
  decoded back to text with the same tokenizer (``item_texts``), so templates, prompts and
  truncation apply to them exactly as to text.
* ``HFTextEncoder``: templates, then tokens, for encoders.
* ``HFPairAdapter``: a sequence classifier over text pairs (rerankers, NLI), one side of each pair
  cut at the model's max length, token types where the model takes them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from sie_server.adapters.base import Encoder, ModelAdapter, require_texts
from sie_server.adapters.hf import (
    load_pretrained,
    load_tokenizer,
    pad_ids,
    parameter_bytes,
    tokenize_texts,
)
from sie_server.domain import InputItem, LoadTarget, TokenizedText
from sie_server.errors import InputTooLong, InvalidInput
from sie_server.tasks.encode import TEMPLATE_KEYS, EncodeSettings, format_text


class HFTextAdapter(ModelAdapter):
    """A fast tokenizer and one transformers model loaded with ``auto_class``."""

    #: The transformers Auto class (by name) that loads the weights.
    auto_class: ClassVar[str] = "AutoModel"
    tokenizer: Any = None
    model: Any = None

    def load(self, target: LoadTarget) -> None:
        import transformers

        self.tokenizer = load_tokenizer(target.source)
        self.model = load_pretrained(getattr(transformers, self.auto_class), target)
        self.device = target.device
        self.after_load(target)

    def after_load(self, target: LoadTarget) -> None:
        """Family-specific loading once tokenizer and model are there (heads, options)."""
        return

    def modules(self) -> list[Any]:
        """The torch modules this family holds (for memory accounting)."""
        return [self.model]

    def concurrent_passes(self) -> bool:
        """A torch transformers model's pass only reads it (under ``inference_mode``); an
        engine that runs the pass elsewhere (ONNX Runtime, with threads of its own) leaves
        ``model`` None and runs alone."""
        return self.model is not None

    def unload(self) -> None:
        self.model = None

    def memory_bytes(self) -> int:
        return sum(parameter_bytes(m) for m in self.modules() if m is not None)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def item_texts(self, items: Sequence[InputItem]) -> list[str]:
        """Each item's text (``require_texts``), items sent as token ids decoded first (tokenizer
        pool): ids outside the vocabulary, or ids together with text, are ``InvalidInput``."""
        if any(item.token_ids for item in items):
            items = [
                dataclasses.replace(item, text=self.decode_ids(index, item), token_ids=())
                if item.token_ids
                else item
                for index, item in enumerate(items)
            ]
        return require_texts(items, self.spec.name)

    def decode_ids(self, index: int, item: InputItem) -> str:
        """Item ``index``'s token ids as text, special tokens skipped."""
        name = self.spec.name
        if item.text is not None:
            raise InvalidInput(f"item {index} has both text and token_ids", model=name)
        vocab = len(self.tokenizer)
        bad = next((t for t in item.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidInput(
                f"item {index}: token id {bad} is outside the vocabulary of {name} (0..{vocab - 1})",
                model=name,
            )
        return str(self.tokenizer.decode(list(item.token_ids), skip_special_tokens=True))

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[TokenizedText]:
        """Token ids with special tokens, cut at ``max_length`` (default: the model's)."""
        return tokenize_texts(self.tokenizer, texts, max_length or self.max_length)

    def pad(self, payloads: Sequence[TokenizedText]) -> Any:
        """Right-padded (input_ids, attention_mask) on the model's device."""
        return pad_ids([p.input_ids for p in payloads], self.pad_id, self.device)


class HFTextEncoder(HFTextAdapter, Encoder[TokenizedText]):
    """A text encoder: templates, then tokenize; pad to collate. Families add ``run_encode``."""

    encode_options = TEMPLATE_KEYS

    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[TokenizedText]:
        texts = self.item_texts(items)
        return self.tokenize([format_text(text, settings) for text in texts])

    def collate_encode(self, payloads: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        return self.pad(payloads)


class HFPairAdapter(HFTextAdapter):
    """A sequence classifier over (first, second) text pairs."""

    auto_class = "AutoModelForSequenceClassification"
    #: Whether the tokenizer makes ``token_type_ids`` and the model's forward takes them
    #: (BERT does; sentence-transformers and transformers' pipelines feed them the same way).
    token_types: bool = False

    def after_load(self, target: LoadTarget) -> None:
        self.token_types = "token_type_ids" in self.tokenizer.model_input_names and (
            "token_type_ids" in inspect.signature(self.model.forward).parameters
        )

    def check_fixed_side(self, text: str, *, what: str) -> None:
        """Raise ``InputTooLong`` when ``text`` (the side of a pair that is never cut) leaves no
        room for one token of the other side within the model's max length."""
        count = len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        fixed = count + self.tokenizer.num_special_tokens_to_add(pair=True)
        if fixed >= self.max_length:
            raise InputTooLong(
                f"the {what} is {count} tokens ({fixed} with special tokens); with "
                f"max_sequence_length {self.max_length} no token of the other text fits",
                model=self.spec.name,
            )

    def tokenize_pairs(
        self,
        firsts: Sequence[str],
        seconds: Sequence[str],
        *,
        truncation: Literal["only_first", "only_second"],
    ) -> list[TokenizedText]:
        """Pair ids with special tokens, one side cut at the max length; ``truncated`` tells
        whether that side lost tokens, ``extra`` holds the token type ids when the model uses
        them."""
        if not firsts:
            return []
        enc = self.tokenizer(
            list(firsts),
            list(seconds),
            truncation=truncation,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=self.token_types,
        )
        ids: list[list[int]] = enc["input_ids"]
        types: Sequence[Sequence[int] | None] = (
            enc["token_type_ids"] if self.token_types else [None] * len(ids)
        )
        encodings = enc.encodings or [None] * len(ids)
        return [
            TokenizedText(
                input_ids=list(row),
                truncated=bool(e is not None and e.overflowing),
                extra=list(t) if t is not None else None,
            )
            for row, t, e in zip(ids, types, encodings, strict=True)
        ]

    def pad_pairs(self, payloads: Sequence[TokenizedText]) -> dict[str, Any]:
        """Right-padded model kwargs (input_ids, attention_mask, token_type_ids) on the device."""
        ids, mask = self.pad(payloads)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:
            inputs["token_type_ids"] = pad_ids([p.extra for p in payloads], 0, self.device)[0]
        return inputs
