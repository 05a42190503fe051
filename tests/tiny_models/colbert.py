"""A tiny random ColBERT v2 checkpoint saved the way stanford ColBERT's ``HF_ColBERT`` saves
one, and a reference encoder written from the ColBERT repo's formulas, independent of the
adapter (one text at a time, no batch padding)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config

HIDDEN = 32
DIM = 16
QUERY_MARKER = "[unused0]"
DOC_MARKER = "[unused1]"


def build_tiny_colbert(folder: Path) -> Path:
    """Write config, tokenizer and ``model.safetensors`` (``bert.*`` + ``linear.weight``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = minilm_tokenizer()
    config = tiny_bert_config(tokenizer, HIDDEN, max_position_embeddings=128)
    torch.manual_seed(0)

    class HFColBERT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)
            self.linear = torch.nn.Linear(HIDDEN, DIM, bias=False)

    model = HFColBERT().eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_colbert(
    folder: Path,
    texts: Sequence[str],
    *,
    is_query: bool,
    query_maxlen: int,
    doc_maxlen: int,
) -> list[np.ndarray]:
    """ColBERT's Q / D per text: [CLS] marker tokens... [SEP] (queries padded with [MASK],
    not attended, all rows kept; documents without punctuation rows), linear, normalize."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    bert = BertModel(BertConfig.from_pretrained(folder)).eval()
    bert.load_state_dict({k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")})
    linear = state["linear.weight"]

    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    marker = tokenizer.convert_tokens_to_ids(QUERY_MARKER if is_query else DOC_MARKER)
    skiplist = {
        tokenizer.encode(symbol, add_special_tokens=False)[0] for symbol in string.punctuation
    }
    maxlen = query_maxlen if is_query else doc_maxlen

    out: list[np.ndarray] = []
    for text in texts:
        body = tokenizer.encode(text, add_special_tokens=False)[: maxlen - 3]
        ids = [cls_id, marker, *body, sep_id]
        attention = [1] * len(ids)
        if is_query:
            pad = maxlen - len(ids)
            ids += [mask_id] * pad
            attention += [0] * pad
        with torch.no_grad():
            hidden = bert(
                input_ids=torch.tensor([ids]), attention_mask=torch.tensor([attention])
            ).last_hidden_state[0]
            vectors = torch.nn.functional.normalize(hidden @ linear.T, p=2, dim=-1)
        if not is_query:
            keep = torch.tensor([i not in skiplist and i != pad_id for i in ids])
            vectors = vectors[keep]
        out.append(vectors.numpy().astype(np.float32))
    return out
