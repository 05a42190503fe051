"""The executor's unit of work: one item with a cost, a batch key and a future.

The unit is generic on purpose: an encode item carries token ids, a reranker's item a tokenized
(query, document) pair, a GLiNER item one window of a text; the capability's ``Job`` says which.
Items share a forward pass only when their ``key`` is equal; the ``runner`` knows how to collate
and run such a batch.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from sie_server.domain import BatchRunner


@dataclass(slots=True)
class ItemTiming:
    """Filled in as the item moves: its batch and that batch's forward pass."""

    inference_ms: float = 0.0
    batch_id: int = -1
    #: When that forward pass started (``time.perf_counter()``).
    inference_started: float = 0.0


_ids = itertools.count()


@dataclass(eq=False, slots=True)
class WorkItem:
    payload: Any
    cost: int
    key: Hashable
    runner: BatchRunner
    future: asyncio.Future[Any]
    deadline: float | None = None  # time.monotonic() seconds
    admitted_at: float = field(default_factory=time.monotonic)
    timing: ItemTiming = field(default_factory=ItemTiming)
    seq: int = field(default_factory=lambda: next(_ids))
    #: The request the item belongs to (batching is fair between requests); its own seq if unset.
    request: int = -1
    #: The timer that expires the item while it is still queued (cancelled once it resolves).
    expiry: asyncio.TimerHandle | None = None
    #: The request's span context when tracing is on (``Tracing.capture``): its batch links to it.
    trace: object | None = None
    #: Bulk work (a streamed request): interactive items go first and never wait in its batches.
    bulk: bool = False
    #: Batches of its group and kind that were taken without it (``BatchLimits.max_skips``).
    skips: int = 0

    @property
    def dead(self) -> bool:
        """Resolved already (the caller cancelled, or an error was set)."""
        return self.future.done()

    def __post_init__(self) -> None:
        if self.request < 0:
            self.request = self.seq

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
