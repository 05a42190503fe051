"""Tiny random sequence classifiers (BERT and DeBERTa-v2/v3) with the real MiniLM WordPiece
tokenizer, saved with ``save_pretrained`` (or sentence-transformers' own ``save``), and the
reference libraries that score them: sentence-transformers' ``CrossEncoder`` and transformers'
``zero-shot-classification`` pipeline.

Weights use ``initializer_range`` 0.3 so that logits differ visibly between inputs (with the
default 0.02 every sigmoid score sits at 0.5029...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config, tiny_deberta_config

HIDDEN = 32
INIT_RANGE = 0.3
#: The message of the DeprecationWarning that importing transformers' DeBERTa-v2 module emits
#: under torch 2.13 (its ``@torch.jit.script`` helpers).
DEBERTA_JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


def _label_kwargs(num_labels: int, labels: Sequence[str] | None) -> dict[str, Any]:
    if labels is None:
        return {"num_labels": num_labels}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def _save(model: Any, tokenizer: Any, folder: Path, model_max_length: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    return folder


def build_bert_classifier(
    folder: Path,
    *,
    num_labels: int = 1,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    config_extras: Mapping[str, Any] | None = None,
    model_max_length: int | None = None,
) -> Path:
    """A 2-layer ``BertForSequenceClassification``; ``labels`` (in id order) set label2id,
    ``config_extras`` become config.json keys (as older sentence-transformers wrote them)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    config = tiny_bert_config(
        tokenizer, HIDDEN, initializer_range=INIT_RANGE, **_label_kwargs(num_labels, labels)
    )
    for key, value in (config_extras or {}).items():
        setattr(config, key, value)
    model_cls: Any = BertForSequenceClassification
    return _save(model_cls(config), tokenizer, folder, model_max_length)


def build_deberta_classifier(
    folder: Path,
    *,
    num_labels: int = 1,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    model_max_length: int | None = None,
) -> Path:
    """A 2-layer ``DebertaV2ForSequenceClassification`` shaped like DeBERTa-v3 (relative
    attention with position buckets, no absolute positions, no token type embeddings)."""
    import torch
    from transformers import DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    config = tiny_deberta_config(
        tokenizer, HIDDEN, initializer_range=INIT_RANGE, **_label_kwargs(num_labels, labels)
    )
    model_cls: Any = DebertaV2ForSequenceClassification
    return _save(model_cls(config), tokenizer, folder, model_max_length)


def save_as_cross_encoder(source: Path, folder: Path, activation: Any) -> Path:
    """Re-save ``source`` with sentence-transformers' ``CrossEncoder.save`` and an explicit
    activation (stored in config_sentence_transformers.json, with modules.json)."""
    from sentence_transformers import CrossEncoder

    CrossEncoder(str(source), device="cpu", activation_fn=activation).save(str(folder))
    return folder


def cross_encoder_scores(
    folder: Path, pairs: Sequence[tuple[str, str]], max_length: int | None = None
) -> np.ndarray:
    """``CrossEncoder(folder).predict(pairs)`` with its default activation."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu", max_length=max_length)
    scores = model.predict(list(pairs), show_progress_bar=False, convert_to_numpy=True)
    return np.asarray(scores, dtype=np.float32)


def cross_encoder_activation(folder: Path) -> Any:
    """The activation ``CrossEncoder`` picks by default for the model in ``folder``."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(folder), device="cpu").activation_fn


def zero_shot_pipeline(folder: Path) -> Any:
    """transformers' ``zero-shot-classification`` pipeline on the model in ``folder``."""
    from transformers import pipeline

    return pipeline("zero-shot-classification", model=str(folder), device="cpu")


def zero_shot_reference(
    classifier: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    hypothesis_template: str | None = None,
    multi_label: bool = False,
) -> list[list[tuple[str, float]]]:
    """What the pipeline returns: per text, (label, score) from the best label down."""
    kwargs: dict[str, Any] = {"candidate_labels": list(labels), "multi_label": multi_label}
    if hypothesis_template is not None:
        kwargs["hypothesis_template"] = hypothesis_template
    results = classifier(list(texts), **kwargs)
    return [list(zip(r["labels"], r["scores"], strict=True)) for r in results]
