"""The SDK's request and result types, as the SDK reference names them.

Inputs and results are ``TypedDict``s (plain dicts at run time, typed for checkers). Vectors in
results are numpy arrays that view the received bytes (no copy); they are read-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeAlias, TypedDict

import numpy as np
from numpy.typing import NDArray

ImageData: TypeAlias = Any  # PIL.Image.Image | NDArray | bytes | str | Path (Pillow is optional)


class ImageInput(TypedDict, total=False):
    data: ImageData
    format: str  # 'jpeg', 'png', 'webp': inferred when not given


class DocumentInput(TypedDict, total=False):
    data: bytes | str | Path  # raw bytes, or a path the SDK reads
    format: str  # 'pdf', 'docx', 'html', 'md', 'txt', ...


class Item(TypedDict, total=False):
    id: str  # client-provided id, echoed in results
    text: str
    images: list[ImageInput | ImageData]
    document: DocumentInput
    metadata: dict[str, Any]
    multivector: NDArray[np.float32]  # a precomputed query multivector for MaxSim scoring


class SparseResult(TypedDict):
    indices: NDArray[np.int32]
    values: NDArray[np.floating[Any]]


class EncodeResult(TypedDict, total=False):
    id: str
    dense: NDArray[Any]
    sparse: SparseResult
    multivector: NDArray[Any]
    num_tokens: int  # tokens the model processed for this item
    truncated: bool  # whether the input was cut to the model's context


class ScoreEntry(TypedDict):
    item_id: str
    score: float
    rank: int  # 0 = most relevant


class TimingInfo(TypedDict, total=False):
    total_ms: float
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    postprocessing_ms: float


class ScoreResult(TypedDict, total=False):
    model: str
    query_id: str
    scores: list[ScoreEntry]  # sorted by score, highest first
    timing: TimingInfo


class Entity(TypedDict, total=False):
    text: str
    label: str
    score: float
    start: int | None
    end: int | None
    bbox: list[int] | None


class Relation(TypedDict):
    head: str
    tail: str
    relation: str
    score: float


class Classification(TypedDict):
    label: str
    score: float


class DetectedObject(TypedDict):
    label: str
    score: float
    bbox: list[int]


class ExtractResult(TypedDict, total=False):
    id: str
    entities: list[Entity]
    relations: list[Relation]
    classifications: list[Classification]
    objects: list[DetectedObject]
    data: dict[str, Any]


class ProfileInfo(TypedDict):
    is_default: bool
    output_types: list[str]
    output_similarity: dict[str, str]


class ModelInfo(TypedDict, total=False):
    name: str
    loaded: bool
    inputs: list[str]
    outputs: list[str]
    tasks: list[str]
    dims: dict[str, int]
    max_sequence_length: int
    state: str  # 'available', 'loading', 'loaded', 'failed'
    device: str | None
    profiles: dict[str, ProfileInfo]
    error: str


class CapacityInfo(TypedDict, total=False):
    """What a standalone server has: it is ready or not, on one device, with these models."""

    ready: bool
    device: str
    gpu: str
    loaded_models: list[str]
    models: list[dict[str, Any]]  # name, state, queue_depth, queue_pending_items, memory_bytes


__all__ = [
    "CapacityInfo",
    "Classification",
    "DetectedObject",
    "DocumentInput",
    "EncodeResult",
    "Entity",
    "ExtractResult",
    "ImageInput",
    "Item",
    "ModelInfo",
    "ProfileInfo",
    "Relation",
    "ScoreEntry",
    "ScoreResult",
    "SparseResult",
    "TimingInfo",
]
