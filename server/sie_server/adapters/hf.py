"""Helpers shared by the transformers-based adapters: tokenizing with truncation, padding,
loading with the right device and dtype. torch and transformers are imported lazily."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sie_server.domain import LoadTarget, TokenizedText
from sie_server.errors import ModelLoadFailed

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(source: str) -> Any:
    """A fast tokenizer from a hub id (HF cache, HF_HUB_OFFLINE honoured) or a local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, use_fast=True)


def load_processor(source: str, model: str, probe: Callable[[Any], object]) -> Any:
    """A multimodal model's processor as loading picks it (torchvision's image processor when
    torchvision is installed), unless it fails to load or ``probe`` (a family's test input, run
    through it) fails, as with a torchvision build that does not match torch: then the PIL
    backend. ModelLoadFailed when neither works."""
    from transformers import AutoProcessor

    auto: Any = AutoProcessor  # transformers' Auto classes are untyped
    try:
        processor = auto.from_pretrained(source)
        probe(processor)
        return processor
    except Exception as first:
        log.warning("%s: the default processor failed (%s); using the PIL backend", model, first)
        try:
            processor = auto.from_pretrained(source, backend="pil")
            probe(processor)
            return processor
        except Exception as exc:
            raise ModelLoadFailed(
                f"{model}: cannot load the processor ({first}; with the PIL backend: {exc})",
                model=model,
            ) from exc


def model_file(source: str, filename: str) -> Path | None:
    """One file of a model: from a local folder, or from a hub repo through the HF cache
    (HF_HUB_OFFLINE honoured). None when the file is not there."""
    local = Path(source)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, filename))
    except Exception:  # not in the repo, or offline without it cached
        return None


def load_pretrained(model_cls: Any, target: LoadTarget, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained`` on the target's device and dtype, in eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # the server logs loads
    model = model_cls.from_pretrained(target.source, dtype=torch_dtype(target.dtype), **kwargs)
    return model.to(target.device).eval()


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, *, add_special_tokens: bool = True
) -> list[TokenizedText]:
    """Token ids per text, cut at ``max_length`` (special tokens included); ``truncated`` is
    true when the tokenizer dropped tokens."""
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids: list[list[int]] = enc["input_ids"]
    encodings = enc.encodings or [None] * len(ids)
    return [
        TokenizedText(input_ids=list(row), truncated=bool(e is not None and e.overflowing))
        for row, e in zip(ids, encodings, strict=True)
    ]


def pad_ids(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    device: str,
    attended: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id rows into (input_ids, attention_mask) long tensors on ``device``; the mask
    covers the first ``attended[i]`` ids of row i (default: all of them; ColBERT's queries pad
    with [MASK] ids the model reads but does not attend to).

    Filled in numpy and handed to torch without a copy: a torch operator per row took 3-7x the
    time (``bench/bench_collate.py``: 14 medium rows 510 against 90 us, 64 x 256 tokens 3.5
    against 0.8 ms), holding the GIL in the prep pool that the event loop and the model thread
    want."""
    import numpy as np
    import torch

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row) if attended is None else attended[i]] = 1
    return (
        torch.from_numpy(ids).to(device, non_blocking=True),
        torch.from_numpy(mask).to(device, non_blocking=True),
    )


def parameter_bytes(model: Any) -> int:
    """Bytes of a torch module's parameters and buffers."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
    return int(total)
