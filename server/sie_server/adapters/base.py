"""The adapter contract: what the engine asks of a model family.

An adapter is driven in three places, never anywhere else:

* ``tokenize`` runs in the tokenizer pool (HF fast tokenizers release the GIL). It turns texts
  into token ids, truncated at the model's max length; the token count is the item's cost.
* ``collate`` runs in the prep pool while the previous batch is on the model: padding, tensors.
* ``encode_batch`` runs only on the model's own thread, under ``torch.inference_mode``, and
  returns one ``EncodeOutput`` of float32 numpy arrays per item. Output dtype conversion
  (float16/int8/uint8/binary) is the engine's job, not the adapter's.

``load`` happens on the model thread too; heavy imports (torch, transformers) live inside it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from sie_server.catalog import ModelSpec
from sie_server.errors import InvalidInput

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True)
class EncodeSettings:
    """Per-request encode settings after profile resolution. Items share a forward pass only
    when their settings are equal (``batch_key``)."""

    output_types: tuple[str, ...]
    is_query: bool = False
    instruction: str | None = None
    #: Profile options merged with request options (request wins).
    options: Mapping[str, Any] = field(default_factory=dict)

    def batch_key(self) -> tuple[object, ...]:
        # The instruction is folded into the tokens already, so it does not split batches.
        return (self.output_types, self.is_query, _freeze(self.options))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class ImageData:
    data: bytes
    format: str = ""


@dataclass(frozen=True, slots=True)
class InputItem:
    """One request item as the engine sees it (transport-neutral)."""

    text: str | None = None
    images: tuple[ImageData, ...] = ()


@dataclass(slots=True)
class TokenizedText:
    """One item after tokenization: ids with special tokens, cut at max length."""

    input_ids: list[int]
    truncated: bool = False
    #: Adapter-specific extras (e.g. a ColBERT document's skip mask).
    extra: Any = None

    @property
    def cost(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class SparseOutput:
    indices: I32  # ascending vocabulary ids
    values: F32


@dataclass(slots=True)
class EncodeOutput:
    dense: F32 | None = None
    sparse: SparseOutput | None = None
    multivector: F32 | None = None  # [num_tokens, dim]


@dataclass(frozen=True, slots=True)
class LoadTarget:
    """Where and how to load: ``device`` as torch names it, ``dtype`` 'float32'|'bfloat16'|'float16'."""

    source: str
    device: str
    dtype: str


class ModelAdapter(ABC):
    """Base of every model family. Subclasses set ``output_types`` and implement the hooks."""

    #: Output types this family can produce; the catalog lists the subset a model has.
    output_types: ClassVar[frozenset[str]]
    #: Tasks this family serves ("encode" for now; "score" and "extract" come with their adapters).
    tasks: ClassVar[frozenset[str]] = frozenset({"encode"})

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.load_options: Mapping[str, Any] = spec.load_options
        self.max_length = spec.max_sequence_length
        self.device = "cpu"

    # ---- lifecycle (model thread) -------------------------------------------------------
    @abstractmethod
    def load(self, target: LoadTarget) -> None:
        """Load weights and tokenizer from ``target.source`` onto ``target.device``."""

    def unload(self) -> None:
        """Drop references to weights; the engine empties device caches afterwards."""
        return

    def memory_bytes(self) -> int:
        """Bytes held by parameters and buffers (0 when unknown)."""
        return 0

    # ---- input preparation (tokenizer pool) ---------------------------------------------
    def prepare(self, items: Sequence[InputItem], settings: EncodeSettings) -> list[TokenizedText]:
        """Turn request items into costed payloads. Text families use this default (templates,
        then ``tokenize``); multimodal families override it to decode and preprocess images
        here, off the event loop and off the model thread."""
        texts: list[str] = []
        for index, item in enumerate(items):
            if item.images:
                raise InvalidInput(
                    f"item {index}: model {self.spec.name} accepts text only", model=self.spec.name
                )
            if item.text is None:
                raise InvalidInput(f"item {index} has no text", model=self.spec.name)
            texts.append(self.format_text(item.text, settings))
        return self.tokenize(texts, settings)

    def format_text(self, text: str, settings: EncodeSettings) -> str:
        """Apply instruction and query/document templates from the options.

        ``instruction_template`` (default ``"{instruction} {text}"``) wins when an instruction is
        given; else ``query_template`` or ``document_template`` per ``is_query``.
        """
        opts = settings.options
        if settings.instruction:
            template = str(opts.get("instruction_template") or "{instruction} {text}")
            return template.format(instruction=settings.instruction, text=text)
        key = "query_template" if settings.is_query else "document_template"
        side = opts.get(key)
        return str(side).format(text=text) if side else text

    @abstractmethod
    def tokenize(self, texts: Sequence[str], settings: EncodeSettings) -> list[TokenizedText]:
        """Tokenize already formatted texts, truncating at ``self.max_length``."""

    # ---- batches ------------------------------------------------------------------------
    @abstractmethod
    def collate(self, batch: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        """Pad a batch into model inputs (prep pool)."""

    @abstractmethod
    def encode_batch(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        """Run the model on collated inputs (model thread): one output per item, float32."""

    # ---- validation -----------------------------------------------------------------------
    def check_settings(self, settings: EncodeSettings) -> None:
        """Reject settings this family cannot serve (raise InvalidInput)."""
        missing = [t for t in settings.output_types if t not in self.output_types]
        if missing:
            raise InvalidInput(
                f"model {self.spec.name!r} cannot produce {', '.join(missing)}",
                model=self.spec.name,
            )
