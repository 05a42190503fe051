"""Adapter families by the name catalog files use; imported only when a model loads."""

from __future__ import annotations

import importlib

from sie_server.adapters.base import ModelAdapter
from sie_server.catalog import CatalogError, ModelSpec

ADAPTERS: dict[str, str] = {
    "dense": "sie_server.adapters.dense:DenseEncoderAdapter",
    "bge_m3": "sie_server.adapters.bge_m3:BGEM3Adapter",
    "splade": "sie_server.adapters.splade:SpladeAdapter",
    "colbert": "sie_server.adapters.colbert:ColBERTAdapter",
    "cross_encoder": "sie_server.adapters.cross_encoder:CrossEncoderAdapter",
    "nli_zero_shot": "sie_server.adapters.nli_zero_shot:NLIZeroShotAdapter",
    "gliner": "sie_server.adapters.gliner:GLiNERAdapter",
    "gliclass": "sie_server.adapters.gliclass:GLiClassAdapter",
    "clip": "sie_server.adapters.clip:DualEncoderAdapter",
    "colpali": "sie_server.adapters.colpali:ColPaliAdapter",
}


def adapter_class(name: str) -> type[ModelAdapter]:
    """A family by its short name, or any ``package.module:Class`` (out-of-tree adapters)."""
    path = ADAPTERS.get(name, name)
    module_name, _, cls_name = path.partition(":")
    if not cls_name:
        known = ", ".join(sorted(ADAPTERS))
        raise CatalogError(f"unknown adapter {name!r} (known: {known}, or module:Class)")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise CatalogError(f"adapter {path!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise CatalogError(f"{path} is not a ModelAdapter")
    return cls


def create_adapter(spec: ModelSpec) -> ModelAdapter:
    return adapter_class(spec.adapter)(spec)
