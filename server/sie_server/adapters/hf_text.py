"""The Hugging Face text base: what every transformers text family shares (tokenizer and model
loading, unloading, memory, tokenizing with truncation, right-pad collation), so that a family
keeps only what differs: its Auto class, its load-time extras and its forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from sie_server.adapters.base import Encoder, ModelAdapter, require_texts
from sie_server.adapters.hf import (
    load_pretrained,
    load_tokenizer,
    pad_ids,
    parameter_bytes,
    tokenize_texts,
)
from sie_server.domain import InputItem, LoadTarget, TokenizedText
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

    def unload(self) -> None:
        self.model = None

    def memory_bytes(self) -> int:
        return sum(parameter_bytes(m) for m in self.modules() if m is not None)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

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
        texts = require_texts(items, self.spec.name)
        return self.tokenize([format_text(text, settings) for text in texts])

    def collate_encode(self, payloads: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        return self.pad(payloads)
