"""A tiny random BGE-M3 (XLM-RoBERTa + colbert/sparse heads) and an independent reference.

The reference follows FlagEmbedding's ``BGEM3Model`` formulas, one text at a time (no padding),
with its own code: it shares nothing with ``sie_server.adapters.bge_m3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.texts import corpus

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R ids 0..4
HIDDEN = 32


def _train_tokenizer() -> Any:
    """An XLM-R-style Unigram tokenizer trained on the bench texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    data = corpus()
    texts = [t for kind in ("short", "medium", "long") for t in data[kind]]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=1000, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return XLMRobertaTokenizerFast(tokenizer_object=tok)


def build_tiny_bge_m3(folder: Path) -> Path:
    """Save a deterministic tiny BGE-M3 into ``folder`` and return it."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=258,  # positions start at pad_id + 1: room for 256 tokens
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    XLMRobertaModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(torch.nn.Linear(HIDDEN, HIDDEN).state_dict(), folder / "colbert_linear.pt")
    sparse = torch.nn.Linear(HIDDEN, 1)
    with torch.no_grad():  # a positive bias so that most tokens get a nonzero lexical weight
        sparse.bias.fill_(0.5)
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    return folder


def reference_bge_m3(folder: Path, texts: Sequence[str], max_length: int) -> list[dict[str, Any]]:
    """Per text: ``dense`` [H], ``sparse`` {token_id: weight}, ``multivector`` [n-1, H]."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    colbert = torch.nn.Linear(HIDDEN, HIDDEN)
    colbert.load_state_dict(torch.load(folder / "colbert_linear.pt", weights_only=True))
    sparse = torch.nn.Linear(HIDDEN, 1)
    sparse.load_state_dict(torch.load(folder / "sparse_linear.pt", weights_only=True))
    unused = {
        tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name])
        for name in ("cls_token", "eos_token", "pad_token", "unk_token")
        if name in tokenizer.special_tokens_map
    }
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            mask = enc["attention_mask"]
            last = model(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
            # _dense_embedding (cls) + normalize
            dense = torch.nn.functional.normalize(last[:, 0], dim=-1)[0]
            # _sparse_embedding + _process_token_weights
            weights = torch.relu(sparse(last))[0, :, 0].tolist()
            lexical: dict[int, float] = {}
            for w, idx in zip(weights, enc["input_ids"][0].tolist(), strict=True):
                if idx not in unused and w > 0 and w > lexical.get(idx, 0.0):
                    lexical[idx] = w
            # _colbert_embedding + normalize + _process_colbert_vecs
            vecs = colbert(last[:, 1:]) * mask[:, 1:][:, :, None].float()
            vecs = torch.nn.functional.normalize(vecs, dim=-1)[0]
            vecs = vecs[: int(mask.sum()) - 1]
            results.append(
                {
                    "dense": dense.numpy().astype(np.float32),
                    "sparse": lexical,
                    "multivector": vecs.numpy().astype(np.float32),
                    "num_tokens": int(mask.sum()),
                }
            )
    return results
