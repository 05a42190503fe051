"""A tiny random GLiClass (uni-encoder on a 2-layer BERT or DeBERTa-v3-shaped backbone) and the
gliclass pipeline as reference.

Built the way gliclass's ``train.py`` builds a new model: a ``GLiClassModelConfig`` pointing at a
local backbone folder (``encoder_model``), class/text/example token ids right after the
backbone's vocabulary, ``GLiClassModel(config, from_pretrained=True)``, then the pipeline's tokens
(``<<LABEL>>``, ``<<SEP>>``, ``<<EXAMPLE>>``) added to the tokenizer as special tokens and the
embeddings resized. Saved with ``save_pretrained`` together with that tokenizer.

The BERT backbone uses the real MiniLM WordPiece tokenizer. The DeBERTa one (the backbone of
gliclass-*-v1.0) uses transformers' own ``DebertaV2Tokenizer`` (SentencePiece Unigram, Metaspace,
``[CLS] x [SEP]``, as DeBERTa-v3 loads) over a small hand-made vocabulary: single characters plus
a few whole words, so that tokenization, offsets and the ``▁`` prefix behave like the real one.

Weights are re-drawn from seeded normals so that scores spread over (0, 1) instead of all sitting
near 0.5: std 0.1 (0.2 for the two projectors) on BERT; std 0.3 on DeBERTa, whose random logits
otherwise share a large negative offset, with ``normalize_features`` (cosine times the logit
scale) to keep sigmoid scores off 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config, tiny_deberta_config

HIDDEN = 32
PIPELINE_TOKENS = ["<<LABEL>>", "<<SEP>>", "<<EXAMPLE>>"]
#: Whole words of the DeBERTa vocabulary, space-separated (anything else is spelt in characters).
VOCAB_WORDS = (
    "the a an of to in and is on for with at by from it this that one day i will see world "
    "match team won home science cooking travel sport research committee reviewed every claim"
)


def deberta_tokenizer() -> Any:
    """A DeBERTa-v3-style tokenizer over characters and ``VOCAB_WORDS`` (ids 0..4: pad unk cls
    sep mask)."""
    import string

    from transformers import DebertaV2Tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = [(token, 0.0) for token in specials]
    vocab += [
        (c, -6.0) for c in ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation]
    ]
    words = VOCAB_WORDS.split()
    vocab += [("\u2581" + w, -2.0) for w in words] + [(w, -3.0) for w in words]
    return DebertaV2Tokenizer(vocab=vocab, unk_id=1)


def build_tiny_gliclass(
    folder: Path,
    *,
    backbone: str = "bert",
    prompt_first: bool = False,
    pooling: str = "first",
    max_labels_alloc: str | int = "dynamic",
    seed: int = 0,
) -> Path:
    """Save a deterministic tiny GLiClass into ``folder / "model"`` and return that folder.

    ``backbone`` is "bert" or "deberta"; ``prompt_first`` False puts the text before the labels
    (``text<<LABEL>>a<<LABEL>>b<<SEP>>``), True puts the labels first; ``pooling`` is the text
    pooling strategy.
    """
    import torch
    from gliclass import GLiClassModel, GLiClassModelConfig  # type: ignore[import-untyped]
    from transformers import AutoModel

    torch.manual_seed(seed)
    deberta = backbone == "deberta"
    if deberta:
        tokenizer = deberta_tokenizer()
        encoder_config = tiny_deberta_config(tokenizer, HIDDEN)
    else:
        tokenizer = minilm_tokenizer()
        encoder_config = tiny_bert_config(tokenizer, HIDDEN)
    encoder_dir = folder / "backbone"
    auto: Any = AutoModel
    auto.from_config(encoder_config).eval().save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)

    base = len(tokenizer)
    config = GLiClassModelConfig(
        encoder_config=encoder_config,
        encoder_model=str(encoder_dir),
        class_token_index=base,
        text_token_index=base + 1,
        example_token_index=base + 2,
        architecture_type="uni-encoder",
        prompt_first=prompt_first,
        pooling_strategy=pooling,
        scorer_type="simple",
        max_labels_alloc=max_labels_alloc,
        normalize_features=deberta,
    )
    model = GLiClassModel(config, from_pretrained=True)
    tokenizer.add_tokens(PIPELINE_TOKENS, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    assert tokenizer.convert_tokens_to_ids("<<LABEL>>") == config.class_token_index
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = 0.3 if deberta else 0.2 if "projector" in name else 0.1
                param.normal_(0.0, std)
    out = folder / "model"
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reference_pipeline(folder: Path, max_length: int, dtype: Any = None) -> Any:
    """gliclass's own ZeroShotClassificationPipeline on the saved model, on CPU, cutting inputs at
    ``max_length`` tokens (what SIE passes for the catalog's max_sequence_length); ``dtype`` (a
    torch dtype) casts the model first, as SIE's adapter does."""
    from gliclass import GLiClassModel, ZeroShotClassificationPipeline
    from transformers import AutoTokenizer

    model = GLiClassModel.from_pretrained(folder)
    if dtype is not None:
        model = model.to(dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ZeroShotClassificationPipeline(
        model,
        tokenizer,
        max_length=max_length,
        device="cpu",
        progress_bar=False,
    )


def reference_scores(
    pipeline: Any,
    texts: list[str],
    labels: list[str],
    classification_type: str,
    *,
    prompt: str | None = None,
    batch_size: int = 8,
) -> list[dict[str, float]]:
    """Every label's score per text, as the pipeline computes them (``return_hierarchical``
    with a flat label list gives the complete ``{label: score}`` map)."""
    result: list[dict[str, float]] = pipeline(
        texts,
        labels,
        threshold=0.0,
        classification_type=classification_type,
        prompt=prompt,
        batch_size=batch_size,
        return_hierarchical=True,
    )
    return result
