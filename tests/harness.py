"""Running an adapter directly, the way the engine does, without a server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sie_server.adapters.base import (
    EncodeOutput,
    EncodeSettings,
    InputItem,
    LoadTarget,
    ModelAdapter,
)
from sie_server.adapters.registry import create_adapter
from sie_server.catalog.spec import ModelSpec, parse_spec


def make_spec(
    name: str,
    adapter: str,
    weights_path: Path,
    outputs: Mapping[str, int],
    *,
    max_sequence_length: int = 128,
    load_options: Mapping[str, Any] | None = None,
    profiles: Mapping[str, Any] | None = None,
) -> ModelSpec:
    raw: dict[str, Any] = {
        "name": name,
        "adapter": adapter,
        "weights_path": str(weights_path),
        "max_sequence_length": max_sequence_length,
        "outputs": {k: {"dims": v} for k, v in outputs.items()},
        "load_options": dict(load_options or {}),
    }
    if profiles:
        raw["profiles"] = dict(profiles)
    return parse_spec(raw)


def load_adapter(spec: ModelSpec, device: str = "cpu", dtype: str = "float32") -> ModelAdapter:
    adapter = create_adapter(spec)
    adapter.load(LoadTarget(source=spec.weights_source(), device=device, dtype=dtype))
    return adapter


def run_encode(
    adapter: ModelAdapter, texts: Sequence[str], settings: EncodeSettings
) -> list[EncodeOutput]:
    """prepare (templates, tokenize) -> collate -> encode_batch, as one batch."""
    import torch

    adapter.check_settings(settings)
    tokens = adapter.prepare([InputItem(text=t) for t in texts], settings)
    with torch.inference_mode():
        return adapter.encode_batch(adapter.collate(tokens, settings), settings)
