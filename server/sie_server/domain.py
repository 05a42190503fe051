"""Transport-neutral types shared by tasks, adapters and the engine.

Nothing here imports torch, transformers or gRPC. The layering is::

    domain, tasks  <-  adapters  <-  engine  <-  grpc_api

* Request items as the engine sees them (``InputItem``), after the transport decoded them: text,
  images, a multivector, or token ids (decoded to text by the family, where tokenizing runs).
* What adapters produce on the model thread (``EncodeOutput``; scores are plain floats).
* The unit a capability hands the engine for one request: a ``Job`` of ``WorkGroup`` s (payloads
  that may share forward passes, with their cost and a ``BatchRunner``) and a ``finish`` step
  that turns the raw per-payload outputs into the task's result, off the model thread.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
R = TypeVar("R")


# ---- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ImageData:
    """One image as the transport carried it; ``decoded`` is set by the engine's image pool
    (``tasks.images.decode_items``) before a family's prepare step sees the item."""

    data: bytes
    #: "jpeg", "png", "webp" or "" (unknown: sniffed from the bytes).
    format: str = ""
    #: The decoded RGB ``PIL.Image.Image`` (None until the engine decoded it).
    decoded: Any = None


@dataclass(frozen=True, slots=True)
class InputItem:
    """One request item as the engine sees it."""

    text: str | None = None
    images: tuple[ImageData, ...] = ()
    #: A multivector the client computed already ([tokens, dims] float32), e.g. a score query.
    multivector: F32 | None = None
    #: Token ids in the model's vocabulary instead of text (empty: none). A family that can
    #: decode them turns them into text in its prepare step; the others refuse them.
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class TokenizedText:
    """One text after tokenization: ids with special tokens, cut at the model's max length."""

    input_ids: list[int]
    truncated: bool = False
    #: Adapter-specific extras (e.g. a ColBERT document's skip mask).
    extra: Any = None

    @property
    def cost(self) -> int:
        return len(self.input_ids)


#: The engines a model may run its forward pass with (a family lists those it supports).
ENGINES = ("torch", "onnx", "onnx-int8")
#: The longest arrival window a batch may wait for (``--batch-wait-ms``, a catalog entry's
#: ``batch_wait_ms``): a second; the window is also at most a quarter of the last forward pass.
MAX_BATCH_WAIT_MS = 1000


@dataclass(frozen=True, slots=True)
class LoadTarget:
    """Where and how to load: ``device`` as torch names it, ``dtype`` 'float32'|'bfloat16'|'float16',
    ``engine`` one of ``ENGINES`` (the catalog's, or the ``--engine`` flag's), already checked
    against what the family supports."""

    source: str
    device: str
    dtype: str
    engine: str = "torch"


# ---- adapter outputs (model thread, float32) ---------------------------------------------------
@dataclass(slots=True)
class SparseOutput:
    indices: I32  # ascending vocabulary ids
    values: F32


@dataclass(slots=True)
class EncodeOutput:
    dense: F32 | None = None
    sparse: SparseOutput | None = None
    multivector: F32 | None = None  # [num_tokens, dim]


# ---- timing ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Timing:
    """One request's time, in ms: total = tokenization + queue + inference + postprocessing.
    ``queue`` is all the time between admission and the last result that was not the request's
    own forward passes (waiting, collation, other batches running first)."""

    total_ms: float
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    postprocessing_ms: float


# ---- the unit of work a capability hands the engine ---------------------------------------------
class BatchRunner(Protocol):
    """How to turn payloads sharing one key into model inputs and results."""

    def collate(self, payloads: Sequence[Any]) -> Any:
        """Pad and stack payloads (prep pool; also model thread when a batch is split)."""

    def run(self, inputs: Any) -> list[Any]:
        """One forward pass (model thread): one result per payload, in order."""


@dataclass(frozen=True, slots=True)
class WorkGroup:
    """Payloads of one request that may share forward passes with any other payloads of the
    same ``key`` (from any request); ``costs[i]`` is payload i's token count."""

    payloads: Sequence[Any]
    costs: Sequence[int]
    key: Hashable
    runner: BatchRunner


@dataclass(frozen=True, slots=True)
class Job(Generic[R]):
    """One request, prepared: its work groups and how to turn their outputs (one list per group,
    one entry per payload, in order) into the task's result. ``finish`` runs in a worker pool."""

    groups: Sequence[WorkGroup]
    finish: Callable[[list[list[Any]]], R]
    #: Tokens the model sees for this request (reported by metrics).
    tokens: int = 0
