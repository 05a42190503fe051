"""Vision-language dual encoders through transformers: ``CLIPModel`` (``openai/clip-vit-*``,
LAION's OpenCLIP conversions), ``SiglipModel`` and ``Siglip2Model`` (the folder's ``config.json``
``model_type`` picks the class through ``AutoModel``). Texts and images are encoded by separate
towers into one space, compared by cosine.

* A text item is one text-tower pass (``get_text_features``); templates and instructions apply as
  for text encoders, token ids are decoded to text first.
* An item with images is encoded by the image tower (``get_image_features``), its text is not:
  a caption sent along with the image does not change the image's vector (the original SIE
  server's meaning, which the SDK reference's ``Item(text=..., images=[...])`` example relies
  on). Several images give one vector: the mean of their normalised vectors, normalised again
  (order-independent, and one image's vector when there is one).
* Vectors are L2-normalised (``load_options.normalize``, default true), as CLIP and SigLIP
  compare them.

Texts. CLIP pools its EOS token under a causal mask, so padding never changes a text's vector:
texts are tokenized unpadded and right-padded per batch, and cost their tokens. SigLIP pools the
last position and was trained on texts padded to its 64 positions: texts are padded there by the
tokenizer (``padding="max_length"``, its side and pad token), the attention mask passed only when
the tokenizer makes one (SigLIP's SentencePiece does not, SigLIP 2's Gemma does), exactly as
``model(**processor(text=..., padding="max_length"))``; each text then costs the 64 tokens the
tower runs. ``max_sequence_length`` may not exceed the tower's positions, and for SigLIP must
equal them.

Images arrive decoded (RGB ``PIL.Image``; the engine decodes them in its image pool, which also
runs this family's prepare step). The model's processor turns them into numpy float32 pixel
values there; collation stacks them in the model's dtype. An image costs the tokens its tower
runs: the patches, plus CLIP's class token ((224 / 32)^2 + 1 = 50 for ViT-B/32); SigLIP 2's
NaFlex patches padded to ``max_num_patches``. The image processor is the one loading picks
(torchvision's when it is installed), unless it cannot process an image: then the PIL one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sie_server.adapters.base import Encoder
from sie_server.adapters.hf import load_pretrained, load_processor, pad_ids
from sie_server.adapters.hf_text import HFTextAdapter
from sie_server.adapters.st_config import normalize_option
from sie_server.catalog import CatalogError
from sie_server.domain import EncodeOutput, InputItem, LoadTarget, TokenizedText
from sie_server.errors import InternalError, InvalidInput, ModelLoadFailed
from sie_server.tasks.encode import TEMPLATE_KEYS, EncodeSettings, format_text

#: The model types served, and whether their text tower needs texts padded to its positions
#: (SigLIP pools the last position) or takes them at their length (CLIP pools its EOS token).
FIXED_TEXT_LENGTH: dict[str, bool] = {"clip": False, "siglip": True, "siglip2": True}


@dataclass(frozen=True, slots=True)
class ImagePayload:
    """One item's images as the processor made them: every array has one row per image."""

    arrays: dict[str, np.ndarray]
    images: int
    tokens_per_image: int

    @property
    def cost(self) -> int:
        return self.images * self.tokens_per_image

    @property
    def truncated(self) -> bool:
        return False


Payload = TokenizedText | ImagePayload


@dataclass(frozen=True, slots=True)
class TowerBatch:
    """Collated model inputs for one tower, and how many rows (images) each item has."""

    tower: str
    inputs: dict[str, Any]
    rows: tuple[int, ...]


class DualEncoderAdapter(HFTextAdapter, Encoder[Payload]):
    """Texts through the text tower, images through the image tower: one dense vector per item,
    the two kinds of items batched apart (``modality``)."""

    output_types = frozenset({"dense"})
    encode_options = TEMPLATE_KEYS
    processor: Any = None
    normalize: bool = True
    #: SigLIP: texts padded to the tower's positions; the attention mask only when the
    #: tokenizer makes one.
    fixed_length: bool = False
    text_mask: bool = True
    patch_size: int = 0
    #: 1 when the vision tower prepends a class token to the patches (CLIP), else 0.
    class_tokens: int = 0
    dtype: Any = None

    def check_spec(self) -> None:
        super().check_spec()
        normalize_option(self.load_options, self.spec.name)

    # ---- loading ----------------------------------------------------------------------------
    def load(self, target: LoadTarget) -> None:
        from transformers import AutoConfig, AutoModel

        name = self.spec.name
        config = AutoConfig.from_pretrained(target.source)
        if config.model_type not in FIXED_TEXT_LENGTH:
            raise ModelLoadFailed(
                f"{name}: adapter 'clip' serves {', '.join(FIXED_TEXT_LENGTH)} models, "
                f"not {config.model_type!r}",
                model=name,
            )
        self.fixed_length = FIXED_TEXT_LENGTH[config.model_type]
        self.check_config(config)
        self.processor = load_processor(target.source, name, probe)
        self.tokenizer = self.processor.tokenizer
        self.text_mask = "attention_mask" in self.tokenizer.model_input_names
        self.model = load_pretrained(AutoModel, target)
        self.device, self.dtype = target.device, self.model.dtype
        self.patch_size = int(config.vision_config.patch_size)
        embeddings = self.model.vision_model.embeddings
        self.class_tokens = 1 if hasattr(embeddings, "class_embedding") else 0
        self.normalize = normalize_option(self.load_options, name) is not False

    def check_config(self, config: Any) -> None:
        """The catalog's dims and text length against the model's (CatalogError)."""
        name = self.spec.name
        dims = int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size)
        dense = self.spec.outputs["dense"]
        if dense.dims != dims:
            raise CatalogError(
                f"{name}: outputs.dense.dims is {dense.dims}, the model gives {dims}"
            )
        positions = int(config.text_config.max_position_embeddings)
        if self.max_length > positions or (self.fixed_length and self.max_length != positions):
            need = "equal" if self.fixed_length else "be at most"
            raise CatalogError(
                f"{name}: max_sequence_length is {self.max_length}; it must {need} the text "
                f"tower's {positions} positions"
            )

    def unload(self) -> None:
        super().unload()
        self.processor = None

    # ---- hooks ------------------------------------------------------------------------------
    def modality(self, payload: Payload) -> str:
        return "image" if isinstance(payload, ImagePayload) else "text"

    def prepare_encode(self, items: Sequence[InputItem], settings: EncodeSettings) -> list[Payload]:
        """Image items through the processor, the other items' texts through the tokenizer."""
        texts = {
            index: format_text(self.item_text(index, item), settings)
            for index, item in enumerate(items)
            if not item.images
        }
        tokens = dict(zip(texts, self.tokenize(list(texts.values())), strict=True))
        return [
            tokens[index] if index in tokens else self.image_payload(index, item)
            for index, item in enumerate(items)
        ]

    def collate_encode(self, payloads: Sequence[Payload], settings: EncodeSettings) -> TowerBatch:
        images = [p for p in payloads if isinstance(p, ImagePayload)]
        if images and len(images) != len(payloads):
            raise InternalError("a batch mixes texts and images")
        if images:
            return self.collate_images(images)
        return self.collate_texts([p for p in payloads if isinstance(p, TokenizedText)])

    def run_encode(self, inputs: TowerBatch, settings: EncodeSettings) -> list[EncodeOutput]:
        """One tower's forward pass; one normalised float32 vector per item."""
        if inputs.tower == "image":
            features = self.model.get_image_features(**inputs.inputs).pooler_output
        else:
            features = self.model.get_text_features(**inputs.inputs).pooler_output
        rows = self.item_vectors(features.float(), inputs.rows).cpu().numpy()
        return [EncodeOutput(dense=np.ascontiguousarray(row)) for row in rows]

    # ---- texts ------------------------------------------------------------------------------
    def item_text(self, index: int, item: InputItem) -> str:
        """The text of an item without images (token ids decoded)."""
        if item.token_ids:
            return self.decode_ids(index, item)
        if item.text is None:
            raise InvalidInput(f"item {index} has no text or image", model=self.spec.name)
        return item.text

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[TokenizedText]:
        """Ids with special tokens, cut at the max length; SigLIP's padded to it, with the
        tokenizer's attention mask (when it makes one) in ``extra``."""
        if not texts:
            return []
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length or self.max_length,
            padding="max_length" if self.fixed_length else False,
            return_attention_mask=self.fixed_length and self.text_mask,
            return_token_type_ids=False,
        )
        ids: list[list[int]] = enc["input_ids"]
        masks = enc.get("attention_mask") or [None] * len(ids)
        encodings = enc.encodings or [None] * len(ids)
        return [
            TokenizedText(list(row), bool(e is not None and e.overflowing), mask)
            for row, mask, e in zip(ids, masks, encodings, strict=True)
        ]

    def collate_texts(self, texts: Sequence[TokenizedText]) -> TowerBatch:
        import torch

        rows = (1,) * len(texts)
        if not self.fixed_length:
            ids, mask = pad_ids([t.input_ids for t in texts], self.pad_id, self.device)
            return TowerBatch("text", {"input_ids": ids, "attention_mask": mask}, rows)
        inputs = {"input_ids": torch.tensor([t.input_ids for t in texts], device=self.device)}
        if self.text_mask:
            inputs["attention_mask"] = torch.tensor([t.extra for t in texts], device=self.device)
        return TowerBatch("text", inputs, rows)

    # ---- images -----------------------------------------------------------------------------
    def image_payload(self, index: int, item: InputItem) -> ImagePayload:
        """The item's decoded images through the model's processor (image pool)."""
        pictures = [image.decoded for image in item.images]
        if any(picture is None for picture in pictures):  # the engine decodes before prepare
            raise InternalError(f"item {index}: an image was not decoded before preparation")
        made = self.processor(images=pictures, return_tensors="np")
        arrays = {key: np.asarray(value) for key, value in made.items()}
        pixels = arrays["pixel_values"].astype(np.float32, copy=False)
        arrays["pixel_values"] = pixels
        return ImagePayload(arrays, len(pictures), self.image_tokens(pixels))

    def image_tokens(self, pixels: np.ndarray) -> int:
        """Tokens the vision tower runs per image: NaFlex patch rows [images, patches, dim]
        (padded), or the patch grid of [images, channels, height, width] plus a class token."""
        if pixels.ndim == 3:
            return int(pixels.shape[1])
        height, width = (int(size) for size in pixels.shape[-2:])
        return (height // self.patch_size) * (width // self.patch_size) + self.class_tokens

    def collate_images(self, images: Sequence[ImagePayload]) -> TowerBatch:
        """Every array stacked over the batch's images; floating ones in the model's dtype."""
        import torch

        inputs: dict[str, Any] = {}
        for key in images[0].arrays:
            stacked = torch.from_numpy(np.concatenate([p.arrays[key] for p in images]))
            if stacked.is_floating_point():
                stacked = stacked.to(self.dtype)
            inputs[key] = stacked.to(self.device, non_blocking=True)
        return TowerBatch("image", inputs, tuple(p.images for p in images))

    def item_vectors(self, features: Any, rows: tuple[int, ...]) -> Any:
        """[rows, dims] float32 features to one vector per item: normalised, an item's rows
        averaged and normalised again."""
        import torch

        normalize = torch.nn.functional.normalize
        if self.normalize:
            features = normalize(features, dim=-1)
        if all(count == 1 for count in rows):
            return features
        vectors = torch.stack([part.mean(dim=0) for part in features.split(list(rows))])
        return normalize(vectors, dim=-1) if self.normalize else vectors


#: The image a processor is tried on at load.
PROBE_SIZE = (8, 8)


def probe(processor: Any) -> None:
    """Turn a small image into pixel values (what serving needs of the processor)."""
    from PIL import Image

    processor(images=[Image.new("RGB", PROBE_SIZE)], return_tensors="np")
