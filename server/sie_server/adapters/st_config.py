"""Reading sentence-transformers' own files (modules.json, 1_Pooling/config.json) so that a
model saved by sentence-transformers is served with the pooling it was trained with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sie_server.adapters.hf import model_file


@dataclass(frozen=True, slots=True)
class STDefaults:
    pooling: str | None = None
    normalize: bool | None = None


def read_model_file(source: str, filename: str) -> Any | None:
    """A JSON file of the model (local folder or hub cache); None when it does not exist."""
    path = model_file(source, filename)
    return json.loads(path.read_text()) if path is not None else None


def sentence_transformers_defaults(source: str) -> STDefaults:
    modules = read_model_file(source, "modules.json")
    if not isinstance(modules, list):
        return STDefaults()
    types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    pooling: str | None = None
    if "Pooling" in types:
        folder = str(types["Pooling"].get("path", "1_Pooling"))
        config = read_model_file(source, f"{folder}/config.json") or {}
        for key, mode in (
            ("pooling_mode_cls_token", "cls"),
            ("pooling_mode_mean_tokens", "mean"),
            ("pooling_mode_max_tokens", "max"),
            ("pooling_mode_lasttoken", "last"),
        ):
            if config.get(key):
                pooling = mode
                break
    return STDefaults(pooling=pooling, normalize="Normalize" in types)
