"""Random peft LoRA adapters on the tiny dense model (``tests/tiny_models/dense.py``), and
peft's own ``PeftModel`` output, pooled as the model's sentence-transformers pipeline pools
(mean over the attention mask, then L2 normalisation), as the reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: The attention projections the adapters train (BERT's module names).
TARGETS = ("query", "value")


def build_lora(folder: Path, base: Path, *, seed: int, rank: int = 4) -> Path:
    """A LoRA adapter on the transformers model saved in ``base``, saved with peft's
    ``save_pretrained``. ``init_lora_weights=False`` draws both A and B at random (peft's default
    B is zero, which would leave the outputs unchanged), from ``seed``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False
    )
    get_peft_model(AutoModel.from_pretrained(base), config).save_pretrained(str(folder))
    return folder


def mean_pooled(model: object, base: Path, texts: Sequence[str]) -> np.ndarray:
    """``model``'s last hidden states for ``texts`` (one padded batch, ``base``'s tokenizer),
    mean-pooled over the attention mask and L2-normalised, as float32 rows."""
    import torch
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(base)(list(texts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state  # type: ignore[operator]
    keep = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
    return np.asarray(torch.nn.functional.normalize(pooled, dim=-1).numpy(), dtype=np.float32)


def reference_lora(base: Path, lora: Path | None, texts: Sequence[str]) -> np.ndarray:
    """The vectors of ``texts`` through ``PeftModel.from_pretrained(base model, lora)`` (the
    plain base model when ``lora`` is None)."""
    from peft import PeftModel
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base).eval()
    if lora is not None:
        model = PeftModel.from_pretrained(model, str(lora)).eval()
    return mean_pooled(model, base, texts)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, dims] arrays."""
    dots = (got * want).sum(axis=1)
    return np.asarray(dots / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)))
