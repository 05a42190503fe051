"""Tiny random vision-language dual encoders (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``),
each saved with its processor, and transformers itself as the reference.

No CLIP, SigLIP or Gemma tokenizer is available offline, so every model's tokenizer is the real
MiniLM WordPiece one (30522 tokens), its ``model_input_names`` set as the real model's tokenizer
has them: CLIP's and Gemma's (SigLIP 2) give an attention mask, SigLIP's SentencePiece gives
input ids only. The text configs point bos/eos/pad at its [CLS]/[SEP]/[PAD] ids, so CLIP pools
at the [SEP] token. The image processors are the PIL-backend ones (transformers' default needs
torchvision): CLIP and SigLIP see 32x32 images in 8x8 patches (16 patches, + CLIP's class
token); SigLIP 2 (NaFlex) keeps the aspect ratio in 16x16 patches padded to 256, the defaults its
processor call applies whatever the image processor's own config says.

The reference is what transformers documents: ``processor(text=..., images=...)``, then
``model.get_text_features`` / ``get_image_features``, L2-normalised; SigLIP texts padded to the
64 positions (``padding="max_length"``), as the model was trained.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer

HIDDEN = 32
#: CLIP's projection (the dense dims); SigLIP's embedding is the vision tower's hidden size.
CLIP_DIMS = 16
SIGLIP_DIMS = HIDDEN
CLIP_TEXT_POSITIONS = 77
SIGLIP_TEXT_POSITIONS = 64
IMAGE_SIZE = 32
PATCH_SIZE = 8
#: Vision tokens per image: CLIP adds its class token to the patches, SigLIP has none.
CLIP_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
SIGLIP_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
SIGLIP2_PATCH_SIZE = 16
SIGLIP2_IMAGE_TOKENS = 256


def _tokenizer(input_names: Sequence[str], max_length: int) -> Any:
    """The MiniLM tokenizer, reloaded with ``model_input_names`` and its lengths set to the text
    tower's positions (as the real tokenizers have them; MiniLM's saved config says 128), all
    saved with it."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        minilm_tokenizer().save_pretrained(folder)
        return AutoTokenizer.from_pretrained(
            folder,
            model_input_names=list(input_names),
            model_max_length=max_length,
            max_length=max_length,
        )


def _text_config(tokenizer: Any, positions: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": positions,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }


def _vision_config(**extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **extra,
    }


def _save(model: Any, processor_class: Any, images: Any, tokenizer: Any, folder: Path) -> Path:
    """The model and ``processor_class(images, tokenizer)`` saved into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    processor_class(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _widen(model: Any, seed: int) -> Any:
    """Redraw every weight matrix from N(0, 1 / fan_in) (seeded): the default N(0, 0.02^2) makes
    a random tower map every input to nearly the same vector, so rankings would hinge on
    rounding."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(noise / parameter.shape[-1] ** 0.5)
    return model


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A 2-layer ``CLIPModel`` (projection 16) with ``CLIPProcessor`` (PIL image processor)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tokenizer(["input_ids", "attention_mask"], CLIP_TEXT_POSITIONS)
    config = CLIPConfig(
        text_config=_text_config(tokenizer, CLIP_TEXT_POSITIONS),
        vision_config=_vision_config(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        projection_dim=CLIP_DIMS,
    )
    model = _widen(CLIPModel(config), seed)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return _save(model, CLIPProcessor, images, tokenizer, folder)


def build_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A 2-layer ``SiglipModel`` with ``SiglipProcessor``: texts without an attention mask."""
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = _tokenizer(["input_ids"], SIGLIP_TEXT_POSITIONS)
    config = SiglipConfig(
        text_config=_text_config(tokenizer, SIGLIP_TEXT_POSITIONS),
        vision_config=_vision_config(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
    )
    model = _widen(SiglipModel(config), seed)
    images = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(model, SiglipProcessor, images, tokenizer, folder)


def build_tiny_siglip2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer ``Siglip2Model`` (NaFlex) with ``Siglip2Processor``: texts with a mask."""
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )

    tokenizer = _tokenizer(["input_ids", "attention_mask"], SIGLIP_TEXT_POSITIONS)
    config = Siglip2Config(
        text_config=_text_config(tokenizer, SIGLIP_TEXT_POSITIONS),
        vision_config=_vision_config(
            num_patches=SIGLIP2_IMAGE_TOKENS, patch_size=SIGLIP2_PATCH_SIZE
        ),
    )
    model = _widen(Siglip2Model(config), seed)
    images = Siglip2ImageProcessorPil(
        patch_size=SIGLIP2_PATCH_SIZE, max_num_patches=SIGLIP2_IMAGE_TOKENS
    )
    return _save(model, Siglip2Processor, images, tokenizer, folder)


# ---- images -----------------------------------------------------------------------------------
def random_image(width: int, height: int, seed: int) -> Any:
    """An RGB ``PIL.Image``: seeded 4x4 colour blocks plus noise (blocks survive resizing and
    JPEG, so different seeds stay apart)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    pixels = np.asarray(blocks.resize((width, height), Image.Resampling.NEAREST), np.float32)
    noisy = pixels + rng.normal(0, 20, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def image_bytes(image: Any, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def decoded(data: bytes) -> Any:
    """Bytes as the server decodes them: an RGB ``PIL.Image``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGB")


# ---- the reference ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def loaded(folder: Path) -> tuple[Any, Any]:
    """(model, processor) as transformers loads them from ``folder`` (cached per folder)."""
    from transformers import AutoModel, AutoProcessor

    auto: Any = AutoProcessor  # untyped
    return AutoModel.from_pretrained(folder).eval(), auto.from_pretrained(folder)


def _normalized(features: Any) -> np.ndarray:
    import torch

    return np.asarray(torch.nn.functional.normalize(features.float(), dim=-1), dtype=np.float32)


def reference_texts(folder: Path, texts: Sequence[str]) -> np.ndarray:
    """Each text alone through the processor and ``get_text_features``, normalised."""
    import torch

    model, processor = loaded(folder)
    fixed = model.config.model_type.startswith("siglip")
    padding: dict[str, Any] = (
        {"padding": "max_length", "max_length": SIGLIP_TEXT_POSITIONS} if fixed else {}
    )
    rows = []
    with torch.inference_mode():
        for text in texts:
            inputs = processor(text=[text], truncation=True, return_tensors="pt", **padding)
            rows.append(model.get_text_features(**inputs).pooler_output)
    return _normalized(torch.cat(rows))


def reference_images(folder: Path, images: Sequence[Any]) -> np.ndarray:
    """Each ``PIL.Image`` through the processor and ``get_image_features``, normalised."""
    import torch

    model, processor = loaded(folder)
    rows = []
    with torch.inference_mode():
        for image in images:
            inputs = processor(images=[image], return_tensors="pt")
            rows.append(model.get_image_features(**inputs).pooler_output)
    return _normalized(torch.cat(rows))


def reference_item(folder: Path, images: Sequence[Any]) -> np.ndarray:
    """One item's vector from several images: the normalised mean of their normalised vectors."""
    mean = reference_images(folder, images).mean(axis=0)
    return np.asarray(mean / np.linalg.norm(mean), dtype=np.float32)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, dims] arrays."""
    got = np.atleast_2d(got)
    want = np.atleast_2d(want)
    dot = (got * want).sum(axis=1)
    return np.asarray(dot / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)))
