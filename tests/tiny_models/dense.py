"""A tiny random BERT saved the way sentence-transformers saves models, and ST as reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config

HIDDEN = 32


def build_tiny_dense(folder: Path, pooling: str = "mean") -> Path:
    """A seeded 2-layer BERT with the real all-MiniLM-L6-v2 tokenizer, wrapped in
    sentence-transformers modules (Transformer, Pooling, Normalize) and saved with ``save``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertModel

    torch.manual_seed(1)
    raw = folder / "raw"
    tokenizer = minilm_tokenizer()
    config = tiny_bert_config(tokenizer, HIDDEN)
    BertModel(config).eval().save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=128)
    model = SentenceTransformer(
        modules=[transformer, Pooling(HIDDEN, pooling_mode=pooling), Normalize()], device="cpu"
    )
    out = folder / "st"
    model.save(str(out))
    return out


def reference_dense(folder: Path, texts: Sequence[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return np.asarray(model.encode(list(texts), convert_to_numpy=True), dtype=np.float32)
