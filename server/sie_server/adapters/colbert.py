"""ColBERT late-interaction encoders (stanford ColBERT v2 ``HF_ColBERT`` checkpoints, e.g.
``colbert-ir/colbertv2.0``): one vector per token, projected and L2-normalized, for MaxSim.

The checkpoint is a transformer saved under its base-model prefix (``bert.``) plus a bias-free
``linear.weight`` projection (hidden -> dim). Token handling follows the ColBERT repo:

* a marker token goes right after ``[CLS]``: ``[unused0]`` for queries, ``[unused1]`` for
  documents (``query_marker_token`` / ``document_marker_token`` in ``load_options``);
* queries are cut at ``query_maxlen`` (default 32) and padded up to it with ``[MASK]``
  (query augmentation): the mask tokens are not attended but their vectors are kept, so every
  query has ``query_maxlen`` rows;
* documents are cut at ``doc_maxlen`` (default: the spec's ``max_sequence_length``) and keep
  only the vectors of tokens that are not punctuation (ColBERT's ``mask_punctuation``).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sie_server.adapters.hf import model_file, pad_ids, torch_dtype
from sie_server.adapters.hf_text import HFTextEncoder
from sie_server.catalog import CatalogError
from sie_server.domain import EncodeOutput, InputItem, LoadTarget, TokenizedText
from sie_server.errors import ModelLoadFailed
from sie_server.tasks.encode import EncodeSettings, format_text

DEFAULT_QUERY_MAXLEN = 32
DEFAULT_QUERY_MARKER = "[unused0]"
DEFAULT_DOCUMENT_MARKER = "[unused1]"
LINEAR_KEY = "linear.weight"


@dataclass(frozen=True, slots=True)
class ColBERTItem:
    """Per-item extras: how many leading ids are attended, and which rows are returned."""

    attended: int
    keep: tuple[bool, ...]


class ColBERTAdapter(HFTextEncoder):
    output_types = frozenset({"multivector"})
    linear: Any = None
    query_maxlen: int = DEFAULT_QUERY_MAXLEN
    doc_maxlen: int = 0
    query_marker_id: int = 0
    doc_marker_id: int = 0
    mask_id: int = 0
    skiplist: frozenset[int] = frozenset()

    def after_load(self, target: LoadTarget) -> None:
        import torch

        self.query_maxlen = self._length_option("query_maxlen", DEFAULT_QUERY_MAXLEN)
        self.doc_maxlen = self._length_option("doc_maxlen", self.max_length)
        self.query_marker_id = self._token_id("query_marker_token", DEFAULT_QUERY_MARKER)
        self.doc_marker_id = self._token_id("document_marker_token", DEFAULT_DOCUMENT_MARKER)
        self.mask_id = self._special_id("mask_token_id")
        self.skiplist = frozenset(
            int(ids[0])
            for ids in (
                self.tokenizer.encode(symbol, add_special_tokens=False)
                for symbol in string.punctuation
            )
            if ids
        )
        weight = load_linear_weight(target.source, self.spec.name)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        self.linear = linear.to(device=target.device, dtype=torch_dtype(target.dtype)).eval()

    def _length_option(self, key: str, default: int) -> int:
        value = self.load_options.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 4:
            raise CatalogError(f"{self.spec.name}: load_options.{key} must be an integer >= 4")
        if value > self.max_length:
            raise CatalogError(
                f"{self.spec.name}: load_options.{key} ({value}) exceeds "
                f"max_sequence_length ({self.max_length})"
            )
        return value

    def _token_id(self, key: str, default: str) -> int:
        token = str(self.load_options.get(key) or default)
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (
            token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token
        ):
            raise CatalogError(f"{self.spec.name}: {key} {token!r} is not in the vocabulary")
        return int(token_id)

    def _special_id(self, attr: str) -> int:
        token_id = getattr(self.tokenizer, attr, None)
        if token_id is None:
            raise CatalogError(f"{self.spec.name}: the tokenizer has no {attr}")
        return int(token_id)

    def modules(self) -> list[Any]:
        return [self.model, self.linear]

    def unload(self) -> None:
        super().unload()
        self.linear = None

    # ---- text preparation -------------------------------------------------------------------
    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[TokenizedText]:
        texts = [format_text(t, settings) for t in self.item_texts(items)]
        maxlen = self.query_maxlen if settings.is_query else self.doc_maxlen
        marker = self.query_marker_id if settings.is_query else self.doc_marker_id
        # Tokenize with one slot left for the marker, which goes right after [CLS].
        tokens = self.tokenize(texts, maxlen - 1)
        for item in tokens:
            ids = item.input_ids
            ids.insert(1, marker)
            if settings.is_query:
                attended = len(ids)
                ids.extend([self.mask_id] * (maxlen - attended))
                item.extra = ColBERTItem(attended=attended, keep=(True,) * len(ids))
            else:
                keep = tuple(i not in self.skiplist and i != self.pad_id for i in ids)
                item.extra = ColBERTItem(attended=len(ids), keep=keep)
        return tokens

    # ---- batches ----------------------------------------------------------------------------
    def collate_encode(self, payloads: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        pad = self.mask_id if settings.is_query else self.pad_id
        extras: list[ColBERTItem] = [item.extra for item in payloads]
        ids, mask = pad_ids(
            [item.input_ids for item in payloads],
            pad,
            self.device,
            attended=[extra.attended for extra in extras],
        )
        keep = np.zeros(tuple(ids.shape), dtype=bool)
        for i, extra in enumerate(extras):
            keep[i, : len(extra.keep)] = extra.keep
        return ids, mask, keep

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        import torch

        ids, mask, keep = inputs
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        vectors = self.linear(hidden).float()
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        rows = vectors.cpu().numpy()
        return [
            EncodeOutput(multivector=np.ascontiguousarray(row[k], dtype=np.float32))
            for row, k in zip(rows, keep, strict=True)
        ]


# ---- checkpoint ---------------------------------------------------------------------------------
def load_linear_weight(source: str, model_name: str) -> Any:
    """The ``linear.weight`` projection tensor [dim, hidden] of an HF_ColBERT checkpoint,
    from ``model.safetensors`` (single or sharded) or else ``pytorch_model.bin``."""
    import torch

    candidates: list[Path | None] = []
    index = model_file(source, "model.safetensors.index.json")
    if index is not None:
        shard = json.loads(index.read_text()).get("weight_map", {}).get(LINEAR_KEY)
        if shard:
            candidates.append(model_file(source, str(shard)))
    candidates.append(model_file(source, "model.safetensors"))
    for path in candidates:
        if path is None:
            continue
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if LINEAR_KEY in f.keys():  # noqa: SIM118 - safe_open handles have no __contains__
                return f.get_tensor(LINEAR_KEY)
    binary = model_file(source, "pytorch_model.bin")
    if binary is not None:
        state = torch.load(str(binary), map_location="cpu", weights_only=True)
        if LINEAR_KEY in state:
            return state[LINEAR_KEY]
    raise ModelLoadFailed(
        f"{model_name}: no {LINEAR_KEY!r} projection found in {source} "
        "(model.safetensors or pytorch_model.bin)",
        model=model_name,
    )
