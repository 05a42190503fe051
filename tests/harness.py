"""Running an adapter directly, the way the engine does, without a server."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sie_server.adapters.base import Encoder, ModelAdapter
from sie_server.adapters.registry import create_adapter
from sie_server.catalog.spec import ModelSpec, parse_spec
from sie_server.domain import EncodeOutput, InputItem, LoadTarget, TokenizedText
from sie_server.tasks.encode import EncodeSettings


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


def encoder(adapter: ModelAdapter) -> Encoder[TokenizedText]:
    assert isinstance(adapter, Encoder)
    return adapter


def prepare(
    adapter: ModelAdapter, texts: Sequence[str], settings: EncodeSettings
) -> list[TokenizedText]:
    """The encode payloads (templates, tokens) of ``texts``, as the tokenizer pool makes them."""
    return encoder(adapter).prepare_encode([InputItem(text=t) for t in texts], settings)


def run_encode(
    adapter: ModelAdapter, texts: Sequence[str], settings: EncodeSettings
) -> list[EncodeOutput]:
    """prepare (templates, tokenize) -> collate -> run, as one batch."""
    import torch

    model = encoder(adapter)
    tokens = model.prepare_encode([InputItem(text=t) for t in texts], settings)
    with torch.inference_mode():
        return model.run_encode(model.collate_encode(tokens, settings), settings)


def put_in_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay out ``files`` as huggingface_hub stores a downloaded snapshot of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    shutil.copytree(files, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
