"""BGE-M3 (BAAI/bge-m3): one XLM-RoBERTa pass, three outputs, as FlagEmbedding's BGEM3 computes them.

* dense: the CLS hidden state, L2-normalized.
* sparse (lexical weights): ``relu(sparse_linear(hidden))`` per token; per unique token id the
  max weight, without special tokens (cls, eos, pad, unk) and without zero weights.
* multivector: ``colbert_linear(hidden[:, 1:])`` for the real tokens after CLS, each row
  L2-normalized: ``[num_tokens - 1, dim]``.

The two heads live next to the weights as ``colbert_linear.pt`` and ``sparse_linear.pt`` (torch
state dicts of ``Linear(hidden, dim)`` and ``Linear(hidden, 1)``). Only the heads the request's
output types need are run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sie_server.adapters.hf import model_file, torch_dtype
from sie_server.adapters.hf_text import HFTextEncoder
from sie_server.adapters.splade import sparse_rows
from sie_server.domain import F32, EncodeOutput, LoadTarget, SparseOutput
from sie_server.tasks.encode import EncodeSettings

if TYPE_CHECKING:
    import torch

COLBERT_HEAD = "colbert_linear.pt"
SPARSE_HEAD = "sparse_linear.pt"


class BGEM3Adapter(HFTextEncoder):
    output_types = frozenset({"dense", "sparse", "multivector"})
    #: FlagEmbedding's colbert_score divides MaxSim by the query's vector count.
    maxsim_mean = True
    colbert_linear: Any = None
    sparse_linear: Any = None
    unused_ids: Any = None
    vocab_size: int = 0

    def after_load(self, target: LoadTarget) -> None:
        import torch

        hidden = int(self.model.config.hidden_size)
        self.colbert_linear = load_head(target, COLBERT_HEAD, hidden)
        self.sparse_linear = load_head(target, SPARSE_HEAD, hidden)
        special = (
            self.tokenizer.cls_token_id,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            self.tokenizer.unk_token_id,
        )
        self.unused_ids = torch.tensor(
            sorted({i for i in special if i is not None}), dtype=torch.long, device=target.device
        )
        self.vocab_size = max(int(self.model.config.vocab_size), len(self.tokenizer))

    def modules(self) -> list[Any]:
        return [self.model, self.colbert_linear, self.sparse_linear]

    def unload(self) -> None:
        super().unload()
        self.colbert_linear = None
        self.sparse_linear = None

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        ids, mask = inputs
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        outputs = [EncodeOutput() for _ in range(len(ids))]
        kinds = settings.output_types
        if "dense" in kinds:
            for out, row in zip(outputs, self._dense(hidden), strict=True):
                out.dense = row
        if "sparse" in kinds:
            for out, sparse in zip(outputs, self._sparse(hidden, ids, mask), strict=True):
                out.sparse = sparse
        if "multivector" in kinds:
            for out, vecs in zip(outputs, self._multivector(hidden, mask), strict=True):
                out.multivector = vecs
        return outputs

    # ---- the three heads ------------------------------------------------------------------
    def _dense(self, hidden: torch.Tensor) -> list[F32]:
        import torch

        cls = torch.nn.functional.normalize(hidden[:, 0], p=2, dim=-1)
        return [np.ascontiguousarray(row) for row in cls.float().cpu().numpy()]

    def _sparse(
        self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> list[SparseOutput]:
        import torch

        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)  # [batch, seq]
        keep = (mask > 0) & (weights > 0) & ~torch.isin(ids, self.unused_ids)
        item = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(ids)[keep]
        # One key per (item, token id); unique() sorts them, so indices ascend within an item.
        keys, slot = torch.unique(item * self.vocab_size + ids[keep], return_inverse=True)
        best = torch.zeros(len(keys), dtype=weights.dtype, device=weights.device)
        best.scatter_reduce_(0, slot, weights[keep], reduce="amax", include_self=False)
        return sparse_rows(keys // self.vocab_size, keys % self.vocab_size, best, len(ids))

    def _multivector(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[F32]:
        import torch

        vecs = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:].unsqueeze(-1).to(hidden.dtype)
        vecs = torch.nn.functional.normalize(vecs, p=2, dim=-1).float().cpu().numpy()
        counts = (mask.sum(dim=1) - 1).clamp(min=0).tolist()  # right padding: real rows first
        return [np.ascontiguousarray(v[:n]) for v, n in zip(vecs, counts, strict=True)]


def load_head(target: LoadTarget, filename: str, hidden: int) -> torch.nn.Linear:
    """A ``Linear(hidden, out)`` head from a state dict next to the weights, on the target's
    device and dtype (``out`` read from the saved weight)."""
    import torch

    state = torch.load(head_path(target.source, filename), map_location="cpu", weights_only=True)
    out_features, in_features = state["weight"].shape
    if in_features != hidden:
        raise ValueError(f"{filename}: input size {in_features}, model hidden size {hidden}")
    head = torch.nn.Linear(hidden, int(out_features))
    head.load_state_dict(state)
    return head.to(device=target.device, dtype=torch_dtype(target.dtype)).eval()


def head_path(source: str, filename: str) -> Path:
    """The head file next to the weights (local folder or hub cache)."""
    path = model_file(source, filename)
    if path is None:
        raise FileNotFoundError(f"{filename} not found in {source}: a BGE-M3 model needs it")
    return path
