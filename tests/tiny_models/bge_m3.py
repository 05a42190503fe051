"""A tiny random BGE-M3 (XLM-RoBERTa + colbert/sparse heads), and FlagEmbedding as its reference.

The checkpoint folder has what ``BAAI/bge-m3`` has and what FlagEmbedding's ``BGEM3FlagModel``
loads: ``config.json`` + ``model.safetensors`` (the XLM-R encoder), the fast tokenizer files, and
the two heads as torch state dicts, ``colbert_linear.pt`` (``Linear(hidden, hidden)``) and
``sparse_linear.pt`` (``Linear(hidden, 1)``, with a positive bias so that most tokens get a
lexical weight). The encoder is initialised with ``initializer_range=0.2`` instead of the usual
0.02: at 0.02 the CLS state of a 2-layer random model barely depends on the text (dense cosine
0.99999 between any two texts), which would make every dense comparison weak.

The reference is FlagEmbedding 1.4.2 itself (``BGEM3FlagModel`` on the folder, CPU, float32):
it shares no code with ``sie_server.adapters.bge_m3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.texts import corpus

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R ids 0..4
HIDDEN = 32
#: FlagEmbedding's ``weights_for_different_modes`` order.
FLAG_MODES = ("dense", "sparse", "colbert")


def _train_tokenizer() -> Any:
    """An XLM-R-style Unigram tokenizer trained on the bench texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast  # type: ignore[attr-defined]

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
        initializer_range=0.2,
    )
    XLMRobertaModel(config).eval().save_pretrained(folder)  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(folder)
    torch.save(torch.nn.Linear(HIDDEN, HIDDEN).state_dict(), folder / "colbert_linear.pt")
    sparse = torch.nn.Linear(HIDDEN, 1)
    with torch.no_grad():  # a positive bias so that most tokens get a nonzero lexical weight
        sparse.bias.fill_(0.5)
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    return folder


def flag_model(folder: Path, max_length: int) -> Any:
    """FlagEmbedding's ``BGEM3FlagModel`` on the folder: CPU, float32, queries and passages cut
    at ``max_length``, no query instruction."""
    from FlagEmbedding import BGEM3FlagModel  # type: ignore[import-untyped]

    return BGEM3FlagModel(
        str(folder),
        use_fp16=False,
        devices="cpu",
        query_max_length=max_length,
        passage_max_length=max_length,
    )


def reference_bge_m3(
    folder: Path, texts: Sequence[str], max_length: int, model: Any = None
) -> list[dict[str, Any]]:
    """Per text, from ``BGEM3FlagModel.encode``: ``dense`` [H], ``sparse`` {token_id: weight},
    ``multivector`` [n-1, H] and ``num_tokens`` (n, the tokenizer's count with specials)."""
    flag = model if model is not None else flag_model(folder, max_length)
    out = flag.encode(
        list(texts),
        max_length=max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    results: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        ids = flag.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        results.append(
            {
                "dense": np.asarray(out["dense_vecs"][i], dtype=np.float32),
                "sparse": {int(k): float(v) for k, v in out["lexical_weights"][i].items()},
                "multivector": np.asarray(out["colbert_vecs"][i], dtype=np.float32),
                "num_tokens": len(ids),
            }
        )
    return results


def reference_scores(
    model: Any,
    query: str,
    passages: Sequence[str],
    max_length: int,
    weights: Sequence[float] = (0.4, 0.2, 0.4),
) -> dict[str, list[float]]:
    """``BGEM3FlagModel.compute_score`` for (query, passage) pairs: ``dense``, ``sparse``,
    ``colbert`` and ``colbert+sparse+dense`` (``sum(w * score) / sum(w)``, ``weights`` in
    ``FLAG_MODES`` order).

    One pair per batch: in a padded batch FlagEmbedding's colbert score also takes the max
    over the passage's padding positions (zero vectors), so a query token whose best real
    match is negative scores 0 there instead; alone, a pair has no padding and the score is
    FlagEmbedding's own ``colbert_score`` of the encoded vectors."""
    scores: dict[str, list[float]] = model.compute_score(
        [(query, p) for p in passages],
        batch_size=1,
        max_query_length=max_length,
        max_passage_length=max_length,
        weights_for_different_modes=list(weights),
    )
    return scores
