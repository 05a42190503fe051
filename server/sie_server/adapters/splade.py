"""SPLADE sparse encoders (naver/splade-*, opensearch-neural-sparse-*): a masked language model
whose logits become vocabulary weights ``max over tokens of log(1 + relu(logits))``; the nonzero
ones are the item's sparse vector over the tokenizer's vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sie_server.adapters.base import (
    EncodeOutput,
    EncodeSettings,
    LoadTarget,
    ModelAdapter,
    SparseOutput,
    TokenizedText,
)
from sie_server.adapters.hf import (
    load_pretrained,
    load_tokenizer,
    pad_ids,
    parameter_bytes,
    tokenize_texts,
)

if TYPE_CHECKING:
    import torch


class SpladeAdapter(ModelAdapter):
    output_types = frozenset({"sparse"})

    def load(self, target: LoadTarget) -> None:
        from transformers import AutoModelForMaskedLM

        self.tokenizer = load_tokenizer(target.source)
        self.model = load_pretrained(AutoModelForMaskedLM, target)
        self.device = target.device

    def unload(self) -> None:
        self.model = None

    def memory_bytes(self) -> int:
        return parameter_bytes(self.model) if getattr(self, "model", None) is not None else 0

    def tokenize(self, texts: Sequence[str], settings: EncodeSettings) -> list[TokenizedText]:
        return tokenize_texts(self.tokenizer, texts, self.max_length)

    def collate(self, batch: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        return pad_ids([t.input_ids for t in batch], self.tokenizer.pad_token_id or 0, self.device)

    def encode_batch(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        import torch

        ids, mask = inputs
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # [batch, seq, vocab]
        # log1p and relu are monotonic, so max(log1p(relu(x))) == log1p(relu(max(x))): take the
        # max over real tokens first and transform only the [batch, vocab] result.
        logits.masked_fill_(mask.unsqueeze(-1) == 0, float("-inf"))
        weights = torch.log1p(torch.relu(logits.amax(dim=1)))
        item, index = weights.nonzero(as_tuple=True)  # row-major: indices ascend per item
        sparse = sparse_rows(item, index, weights[item, index], len(ids))
        return [EncodeOutput(sparse=s) for s in sparse]


def sparse_rows(
    item: torch.Tensor, index: torch.Tensor, value: torch.Tensor, batch_size: int
) -> list[SparseOutput]:
    """Split flat (item, index, value) entries, sorted by item then index, into one
    ``SparseOutput`` per item; an item without entries gets empty arrays."""
    counts = np.bincount(item.cpu().numpy(), minlength=batch_size)
    cuts = np.cumsum(counts)[:-1]
    indices = np.split(index.cpu().numpy().astype(np.int32), cuts)
    values = np.split(value.float().cpu().numpy(), cuts)
    return [
        SparseOutput(indices=np.ascontiguousarray(i), values=np.ascontiguousarray(v))
        for i, v in zip(indices, values, strict=True)
    ]
