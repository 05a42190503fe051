"""ColPali-family late-interaction retrieval over page images (transformers'
``ColPaliForRetrieval``, e.g. ``vidore/colpali-v1.3-hf``, and ``ColQwen2ForRetrieval``, e.g.
``vidore/colqwen2-v1.0-hf``; the folder's ``config.json`` ``model_type`` picks the class).

A page image and a query text each become one multivector: one row per token the model sees,
projected to the retrieval dim and L2-normalised by the model itself. Pages and queries are
scored with MaxSim (the sum over query rows of the best dot product with a page row), as the
processor's ``score_retrieval`` does.

* The processor makes every input, exactly as transformers documents it: ``process_images`` (the
  image tokens, then the model's visual prompt) and ``process_queries`` (the query prefix, the
  text, then the query-augmentation tokens). Each payload keeps its unpadded token fields and its
  image tensors; batches are right-padded here, and only the attended rows are returned, so a
  payload's vectors do not depend on its batch.
* Text is always encoded as a query (``is_query`` changes nothing, so it is not in the batch
  key); images are always pages. An item is one text or one image.
* A query longer than ``max_sequence_length`` tokens (prefix and augmentation tokens included) is
  cut there, as the tokenizer's right truncation would cut it. A page is never cut: its image
  tokens must all be there.
* The image processor is the one loading picks (torchvision's when it is installed and works,
  else the PIL one), so a machine without torchvision serves these models too.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sie_server.adapters.base import Encoder
from sie_server.adapters.hf import load_pretrained, load_processor, parameter_bytes
from sie_server.catalog import CatalogError
from sie_server.domain import EncodeOutput, ImageData, InputItem, LoadTarget
from sie_server.errors import InvalidInput, ModelLoadFailed, SIEServerError
from sie_server.tasks.common import freeze
from sie_server.tasks.encode import EncodeSettings, format_text

#: transformers' retrieval class for each ``model_type`` this family serves.
RETRIEVAL_MODELS: dict[str, str] = {
    "colpali": "ColPaliForRetrieval",
    "colqwen2": "ColQwen2ForRetrieval",
}
#: Processor outputs with one value per token (right-padded per batch); the others but
#: ``labels`` (training targets) are per-image tensors.
TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
SKIPPED_FIELDS = frozenset({"labels"})
#: The blank page a processor is tried on at load (larger than any family's smallest patch grid).
PROBE_SIZE = (64, 64)


@dataclass(frozen=True, slots=True)
class ColPaliPayload:
    """One query text or one page image as the processor made it: unpadded per-token tensors
    (``input_ids``, ``attention_mask``, ...) and, for a page, its image tensors without a batch
    dimension (``pixel_values``, and ``image_grid_thw`` for ColQwen2)."""

    tokens: Mapping[str, Any]
    pixels: Mapping[str, Any]
    truncated: bool = False

    @property
    def cost(self) -> int:
        """The tokens the language model sees (a page's image tokens included)."""
        return int(self.tokens["input_ids"].shape[0])

    @property
    def is_image(self) -> bool:
        return bool(self.pixels)


class ColPaliAdapter(Encoder[ColPaliPayload]):
    """Page images and query texts to multivectors with a ColPali-family retrieval model and its
    processor (see the module docstring)."""

    output_types = frozenset({"multivector"})
    processor: Any = None
    model: Any = None
    pad_id: int = 0
    dtype: Any = None

    def check_spec(self) -> None:
        super().check_spec()
        if "image" not in self.spec.inputs:
            raise CatalogError(f"{self.spec.name}: adapter 'colpali' needs inputs: [text, image]")

    # ---- lifecycle --------------------------------------------------------------------------
    def load(self, target: LoadTarget) -> None:
        import transformers

        config = transformers.AutoConfig.from_pretrained(target.source)
        model_class = getattr(transformers, self._retrieval_class(config))
        self.processor = load_processor(target.source, self.spec.name, probe)
        self.model = load_pretrained(model_class, target)
        self.device = target.device
        self.dtype = self.model.dtype
        pad = self.processor.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def _retrieval_class(self, config: Any) -> str:
        """The transformers class for the folder's ``model_type``, once its embedding dim is
        known to be the catalog's."""
        name = self.spec.name
        class_name = RETRIEVAL_MODELS.get(str(config.model_type))
        if class_name is None:
            known = ", ".join(sorted(RETRIEVAL_MODELS))
            raise ModelLoadFailed(
                f"{name}: model_type {config.model_type!r} is not a ColPali-family retrieval "
                f"model ({known})",
                model=name,
            )
        dims = self.spec.outputs["multivector"].dims
        if config.embedding_dim != dims:
            raise CatalogError(
                f"{name}: the model's embedding_dim is {config.embedding_dim}, the catalog says "
                f"multivector dims {dims}"
            )
        return class_name

    def unload(self) -> None:
        self.model = None

    def memory_bytes(self) -> int:
        return 0 if self.model is None else parameter_bytes(self.model)

    # ---- preparation (tokenizer or image pool) -----------------------------------------------
    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[ColPaliPayload]:
        pages = [self._page_image(i, item) for i, item in enumerate(items)]
        texts = [
            format_text(item.text or "", settings)
            for item, page in zip(items, pages, strict=True)
            if page is None
        ]
        queries = iter(self._queries(texts))
        return [next(queries) if page is None else self._page(page) for page in pages]

    def _page_image(self, index: int, item: InputItem) -> Any:
        """Item ``index``'s decoded page image, or None for a query text (InvalidInput for an
        item that is neither exactly one text nor exactly one image)."""
        name = self.spec.name
        if item.token_ids:
            raise InvalidInput(
                f"item {index}: model {name} does not accept token ids (send text)", model=name
            )
        if item.images and item.text is not None:
            raise InvalidInput(
                f"item {index} has both text and an image; model {name} encodes a query text "
                "or one page image per item",
                model=name,
            )
        if len(item.images) > 1:
            raise InvalidInput(
                f"item {index} has {len(item.images)} images; model {name} encodes one page "
                "image per item",
                model=name,
            )
        if item.images:
            return _decoded(item.images[0], index)
        if item.text is None:
            raise InvalidInput(f"item {index} has no text or image", model=name)
        return None

    def _queries(self, texts: Sequence[str]) -> list[ColPaliPayload]:
        """``process_queries`` on the texts, each row cut to its attended tokens and to the
        model's max length."""
        if not texts:
            return []
        batch = self.processor.process_queries(list(texts))
        mask = batch["attention_mask"].bool()
        payloads: list[ColPaliPayload] = []
        for row in range(len(texts)):
            tokens = {k: batch[k][row][mask[row]] for k in TOKEN_FIELDS if k in batch}
            truncated = int(tokens["input_ids"].shape[0]) > self.max_length
            if truncated:
                tokens = {k: v[: self.max_length] for k, v in tokens.items()}
            payloads.append(ColPaliPayload(tokens=tokens, pixels={}, truncated=truncated))
        return payloads

    def _page(self, image: Any) -> ColPaliPayload:
        """``process_images`` on one page: its tokens and its image tensors."""
        batch = self.processor.process_images([image])
        tokens = {k: batch[k][0] for k in TOKEN_FIELDS if k in batch}
        pixels = {
            k: v[0] for k, v in batch.items() if k not in TOKEN_FIELDS and k not in SKIPPED_FIELDS
        }
        return ColPaliPayload(tokens=tokens, pixels=pixels)

    def modality(self, payload: ColPaliPayload) -> str:
        return "image" if payload.is_image else "text"

    def encode_key(self, settings: EncodeSettings) -> Hashable:
        # Text is always a query: is_query does not change the forward pass, so queries of
        # encode and score requests share batches.
        return ("encode", settings.output_types, freeze(settings.options))

    # ---- batches ----------------------------------------------------------------------------
    def collate_encode(
        self, payloads: Sequence[ColPaliPayload], settings: EncodeSettings
    ) -> tuple[dict[str, Any], list[int]]:
        """Model kwargs on the device (token fields right-padded, image tensors stacked in the
        model's dtype) and each payload's token count."""
        import torch

        lengths = [p.cost for p in payloads]
        width = max(lengths)
        inputs: dict[str, Any] = {}
        for name in payloads[0].tokens:
            pad = self.pad_id if name == "input_ids" else 0
            rows = torch.full((len(payloads), width), pad, dtype=torch.long)
            for i, payload in enumerate(payloads):
                rows[i, : lengths[i]] = payload.tokens[name]
            inputs[name] = rows.to(self.device, non_blocking=True)
        for name in payloads[0].pixels:
            stacked = stack_padded([p.pixels[name] for p in payloads])
            dtype = self.dtype if stacked.is_floating_point() else None
            inputs[name] = stacked.to(self.device, dtype=dtype, non_blocking=True)
        return inputs, lengths

    def run_encode(
        self, inputs: tuple[dict[str, Any], list[int]], settings: EncodeSettings
    ) -> list[EncodeOutput]:
        kwargs, lengths = inputs
        embeddings = self.model(**kwargs).embeddings.float().cpu().numpy()
        return [
            EncodeOutput(multivector=np.ascontiguousarray(rows[:length], dtype=np.float32))
            for rows, length in zip(embeddings, lengths, strict=True)
        ]


def stack_padded(tensors: Sequence[Any]) -> Any:
    """Stack per-image tensors; ones of different first dims (ColQwen2's patches of differently
    sized pages) are zero-padded to the longest first, as ``ColQwen2Processor`` pads them."""
    import torch

    longest = max(int(t.shape[0]) for t in tensors)
    return torch.stack(
        [
            t
            if t.shape[0] == longest
            else torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
            for t in tensors
        ]
    )


def probe(processor: Any) -> None:
    """Turn a blank page into model inputs (what serving needs of the processor)."""
    from PIL import Image

    processor.process_images([Image.new("RGB", PROBE_SIZE)])


def _decoded(image: ImageData, index: int) -> Any:
    if image.decoded is None:  # the engine decodes every image before prepare
        raise SIEServerError(f"item {index}: image was not decoded before preparation")
    return image.decoded
