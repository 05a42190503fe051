"""A tiny random ``ColPaliForRetrieval`` (PaliGemma: a 2-layer Gemma over a 1-layer SigLIP vision
tower) saved with its ``ColPaliProcessor``, a tiny ``ColQwen2ForRetrieval`` (Qwen2-VL) with its
``ColQwen2Processor``, and transformers itself as the reference.

No Gemma tokenizer is available offline, so the tokenizer is a real ``GemmaTokenizer`` (BPE with
byte fallback, ``▁`` for spaces, ``<pad>``/``<eos>``/``<bos>``/``<unk>``/``<mask>`` at Gemma's ids
0-4) over a vocabulary trained with ``tokenizers`` on a few sentences, plus the 256 byte tokens
Gemma's byte fallback uses. ``ColPaliProcessor`` adds ``<image>`` and PaliGemma's 1152
``<loc>``/``<seg>`` tokens, as it does to the real one. The image processor is the PIL-backend
SigLIP one (transformers' default needs torchvision), 32x32 pixels in 8x8 patches: 16 image
tokens. The reference is what transformers documents: ``processor.process_images`` /
``process_queries``, ``model(**batch).embeddings``, ``processor.score_retrieval``.

ColQwen2's tokenizer is a real ``Qwen2Tokenizer`` (byte-level BPE) over a vocabulary trained the
same way, with Qwen2-VL's special tokens (``<|endoftext|>`` is also the pad and query-augmentation
token, as in the real one); its image processor is the PIL-backend Qwen2-VL one with 4-pixel
patches merged 2x2 and at most 48x48 pixels, so pages of different sizes get different grids and
different numbers of image tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN = 32
DIM = 16
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
#: Gemma's special tokens at Gemma's ids.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
BPE_VOCAB_SIZE = 400
CORPUS = [
    "Question: which quarter had the highest revenue?",
    "Describe the image.",
    "what is late interaction retrieval over page images",
    "a scanned page with a table, a chart and two paragraphs of text",
    "The quick brown fox jumps over the lazy dog.",
]


def tiny_gemma_tokenizer() -> Any:
    """A ``GemmaTokenizer`` over a small BPE vocabulary trained on ``CORPUS``."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *BYTE_TOKENS],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    trained = json.loads(bpe.to_str())["model"]
    return GemmaTokenizer(vocab=trained["vocab"], merges=merges_of(trained))


def merges_of(trained: dict[str, Any]) -> Any:
    """A trained BPE model's merges as (left, right) tuples, what ``tokenizers``' BPE takes
    (transformers annotates them as strings)."""
    return [tuple(pair) for pair in trained["merges"]]


def tiny_colpali_processor() -> Any:
    from transformers import ColPaliProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=IMAGE_TOKENS
    )
    return ColPaliProcessor(image_processor=image_processor, tokenizer=tiny_gemma_tokenizer())


def build_tiny_colpali(folder: Path, seed: int = 0) -> Path:
    """Write config, ``model.safetensors`` and the processor; check the processor reloads with
    the same vocabulary and image tokens."""
    import torch
    from transformers import AutoProcessor, ColPaliConfig, ColPaliForRetrieval, PaliGemmaConfig

    folder.mkdir(parents=True, exist_ok=True)
    processor = tiny_colpali_processor()
    tokenizer = processor.tokenizer
    text = {
        "model_type": "gemma",
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "vision_use_head": False,
    }
    vlm = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    torch.manual_seed(seed)
    model = ColPaliForRetrieval(ColPaliConfig(vlm_config=vlm.to_dict(), embedding_dim=DIM))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    reloaded = AutoProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]
    assert len(reloaded.tokenizer) == len(tokenizer) > BPE_VOCAB_SIZE + 1000, len(tokenizer)
    assert reloaded.image_seq_length == IMAGE_TOKENS
    assert reloaded.image_token_id == processor.image_token_id
    return folder


# ---- ColQwen2 ----------------------------------------------------------------------------------
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_PATCH_SIZE = 4
QWEN_MAX_PIXELS = 48 * 48


def tiny_qwen2_tokenizer() -> Any:
    """A ``Qwen2Tokenizer`` over a small byte-level BPE vocabulary trained on ``CORPUS``, with
    Qwen2-VL's special tokens after it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*CORPUS, "Query: "], trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges_of(trained))
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    return tokenizer


def tiny_colqwen2_processor() -> Any:
    from transformers import ColQwen2Processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH_SIZE,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(4 * QWEN_PATCH_SIZE) ** 2,
        max_pixels=QWEN_MAX_PIXELS,
    )
    return ColQwen2Processor(image_processor=image_processor, tokenizer=tiny_qwen2_tokenizer())


def build_tiny_colqwen2(folder: Path, seed: int = 0) -> Path:
    """Write config, ``model.safetensors`` and the processor; check the processor reloads with
    the same vocabulary."""
    import torch
    from transformers import AutoProcessor, ColQwen2Config, ColQwen2ForRetrieval, Qwen2VLConfig

    folder.mkdir(parents=True, exist_ok=True)
    processor = tiny_colqwen2_processor()
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        # Qwen2-VL's multimodal rotary sections (temporal, height, width) of a 16-dim head.
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "depth": 1,
        "embed_dim": HIDDEN,
        "hidden_size": HIDDEN,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": QWEN_PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    vlm = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = ColQwen2ForRetrieval(ColQwen2Config(vlm_config=vlm.to_dict(), embedding_dim=DIM))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    reloaded = AutoProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]
    assert len(reloaded.tokenizer) == len(tokenizer) > 256 + len(QWEN_SPECIAL_TOKENS)
    assert reloaded.image_token_id == ids["<|image_pad|>"]
    return folder


# ---- the reference: transformers in-process ----------------------------------------------------
def load_reference(folder: Path) -> tuple[Any, Any]:
    """(processor, model) loaded by transformers, float32 on CPU; the model class is the one
    for the folder's ``model_type``."""
    import transformers

    classes = {"colpali": "ColPaliForRetrieval", "colqwen2": "ColQwen2ForRetrieval"}
    model_type = transformers.AutoConfig.from_pretrained(folder).model_type
    model_class = getattr(transformers, classes[model_type])
    processor = transformers.AutoProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]
    return processor, model_class.from_pretrained(folder).eval()


def reference_multivectors(
    reference: tuple[Any, Any], *, images: Sequence[Any] = (), texts: Sequence[str] = ()
) -> list[np.ndarray]:
    """Each page's, then each query's, attended rows of ``model(**batch).embeddings``, every
    input processed alone (no padding): float32 [tokens, DIM]."""
    import torch

    processor, model = reference
    batches = [processor.process_images([image]) for image in images]
    batches += [processor.process_queries([text]) for text in texts]
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in batches:
            rows = model(**batch).embeddings[0][batch["attention_mask"][0].bool()]
            out.append(np.asarray(rows.float().numpy(), dtype=np.float32))
    return out


def reference_scores(
    reference: tuple[Any, Any], query: np.ndarray, pages: Sequence[np.ndarray]
) -> list[float]:
    """``processor.score_retrieval`` of one query's multivector against each page's."""
    import torch

    processor, _ = reference
    scores = processor.score_retrieval(
        [torch.from_numpy(query)], [torch.from_numpy(page) for page in pages]
    )
    return [float(s) for s in scores[0].tolist()]


def page_images(count: int, seed: int = 0) -> list[Any]:
    """``count`` random RGB pages of different sizes (the processor resizes them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 24 + 13 * i, 3), dtype=np.uint8))
        for i in range(count)
    ]
