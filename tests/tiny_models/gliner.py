"""A tiny random GLiNER (uni-encoder, span or token level) on a tiny BERT backbone.

``GLiNER.from_config`` builds the model from a local backbone folder (a tiny ``BertModel`` saved
with the real MiniLM WordPiece tokenizer); weight matrices are then drawn from normal(0, 0.1)
so that scores vary (with the default init every score sits near 0.5). ``save_pretrained``
writes the folder the adapter loads, with ``GLiNER.from_pretrained`` as users do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config

#: Words per window (the config's ``max_len``) and the longest span in words.
MAX_LEN = 24
MAX_WIDTH = 12


def build_tiny_gliner(
    folder: Path, *, span_mode: str = "markerV0", seed: int = 0, **config: Any
) -> Path:
    """Save a deterministic tiny GLiNER into ``folder`` (its backbone in ``folder/backbone``)."""
    import torch
    from gliner import GLiNER, GLiNERConfig
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    backbone = folder / "backbone"
    tokenizer = minilm_tokenizer()
    BertModel(tiny_bert_config(tokenizer, 32)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    settings: dict[str, Any] = {
        "model_name": str(backbone),
        "hidden_size": 32,
        "max_width": MAX_WIDTH,
        "max_len": MAX_LEN,
        "span_mode": span_mode,
        "dropout": 0.0,
    }
    model = GLiNER.from_config(GLiNERConfig(**{**settings, **config}))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    return model_dir


def load_reference(model_dir: Path) -> Any:
    """The same saved model, loaded by the gliner package itself (the reference)."""
    from gliner import GLiNER

    return GLiNER.from_pretrained(str(model_dir), load_tokenizer=True).eval()


def reference_span_probs(reference: Any, text: str, labels: list[str]) -> tuple[Any, list[str]]:
    """GLiNER's own span probabilities for one text, through its modular pipeline
    (``prepare_batch`` -> ``collate_batch`` -> ``run_batch``, then the sigmoid its decoder
    applies): a ``[words, max_width, labels]`` tensor, and the words."""
    import torch

    prepared = reference.prepare_batch([text], labels)
    batch = reference.collate_batch(prepared["input_x"], prepared["entity_types"])
    output = reference.run_batch(batch)
    return torch.sigmoid(output.logits[0]).float(), prepared["tokens"][0]
