"""Dense sentence encoders (BERT, MiniLM, e5, bge, ...): one transformer, pooled, normalized.

Pooling and normalization come from ``load_options`` (``pooling``: cls | mean | max | last,
``normalize``: bool); when absent, from the sentence-transformers files next to the weights
(``modules.json``, ``1_Pooling/config.json``), else mean pooling with normalization.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sie_server.adapters.hf_text import HFTextEncoder
from sie_server.adapters.st_config import sentence_transformers_defaults
from sie_server.catalog import CatalogError
from sie_server.domain import EncodeOutput, LoadTarget
from sie_server.tasks.encode import EncodeSettings

POOLINGS = ("cls", "mean", "max", "last")


class DenseEncoderAdapter(HFTextEncoder):
    output_types = frozenset({"dense"})
    pooling: str = "mean"
    normalize: bool = True

    def after_load(self, target: LoadTarget) -> None:
        defaults = sentence_transformers_defaults(target.source)
        self.pooling = str(self.load_options.get("pooling") or defaults.pooling or "mean")
        if self.pooling not in POOLINGS:
            raise CatalogError(f"{self.spec.name}: pooling must be one of {POOLINGS}")
        normalize = self.load_options.get("normalize")
        self.normalize = bool(defaults.normalize if normalize is None else normalize)

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        import torch

        ids, mask = inputs
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, self.pooling)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        rows = pooled.float().cpu().numpy()
        return [EncodeOutput(dense=np.ascontiguousarray(row)) for row in rows]


def pool(hidden: Any, mask: Any, mode: str) -> Any:
    """Pool [batch, seq, dim] hidden states into [batch, dim] under the attention mask."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    last = mask.sum(1) - 1  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
