"""A tiny random SPLADE (BERT masked LM) and sentence-transformers' SparseEncoder as reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config


def build_tiny_splade(folder: Path) -> Path:
    """Save a deterministic tiny ``BertForMaskedLM`` with the all-MiniLM-L6-v2 BERT tokenizer."""
    import torch
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = minilm_tokenizer()
    config = tiny_bert_config(tokenizer, 32)
    BertForMaskedLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_splade(folder: Path, texts: Sequence[str], max_length: int) -> list[dict[int, float]]:
    """Per text, {token_id: weight} of the nonzero SPLADE-max weights, via SparseEncoder."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    mlm = Transformer(str(folder), transformer_task="fill-mask", max_seq_length=max_length)
    encoder = SparseEncoder(modules=[mlm, SpladePooling(pooling_strategy="max")], device="cpu")
    results: list[dict[int, float]] = []
    for text in texts:  # one at a time: no padding in the reference
        emb: Any = encoder.encode([text], convert_to_tensor=True)
        row = emb.to_dense()[0].float().cpu().numpy().astype(np.float32)
        nz = np.flatnonzero(row)
        results.append({int(i): float(row[i]) for i in nz})
    return results
