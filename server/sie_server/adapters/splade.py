"""SPLADE sparse encoders (naver/splade-*, opensearch-neural-sparse-*): a masked language model
whose logits become vocabulary weights ``max over tokens of log(1 + relu(logits))``; the nonzero
ones are the item's sparse vector over the tokenizer's vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sie_server.adapters.hf_text import HFTextEncoder
from sie_server.domain import EncodeOutput, SparseOutput
from sie_server.tasks.encode import EncodeSettings

if TYPE_CHECKING:
    import torch


class SpladeAdapter(HFTextEncoder):
    output_types = frozenset({"sparse"})
    auto_class = "AutoModelForMaskedLM"

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
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
