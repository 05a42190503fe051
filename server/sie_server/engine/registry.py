"""The model registry: catalog entries, their lifecycle, and the engine's entry points.

States: available -> loading -> loaded, or -> failed. A request for an available model starts a
background load and is answered ``ModelLoading`` (retryable) at once; ``--preload`` awaits the
load at startup. A failed load answers ``ModelLoadFailed`` and is retried by the first request
after ``load_retry_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sie_server.adapters.base import EncodeSettings, InputItem, LoadTarget, ModelAdapter
from sie_server.adapters.registry import adapter_class, create_adapter
from sie_server.catalog import Catalog, ModelSpec
from sie_server.device import Placement
from sie_server.engine.encode import EncodeCall, EncodeOutcome, EncodeRunner, run_encode
from sie_server.engine.executor import BatchExecutor, BatchStats, ExecutorConfig
from sie_server.errors import (
    InvalidInput,
    ModelLoadFailed,
    ModelLoading,
    ModelNotFound,
    ShuttingDown,
)
from sie_server.observability.metrics import BATCH_SIZE_BUCKETS, Metrics

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(slots=True)
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.AVAILABLE
    adapter: ModelAdapter | None = None
    executor: BatchExecutor | None = None
    error: str | None = None
    failed_at: float = 0.0
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    memory_bytes: int = 0
    tasks: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    executor: ExecutorConfig
    placement: Placement
    tokenizer_workers: int = 2
    load_retry_s: float = 30.0
    warmup: bool = True


class ModelRegistry:
    def __init__(
        self, catalog: Catalog, config: EngineConfig, metrics: Metrics | None = None
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.metrics = metrics or Metrics()
        self._entries = {name: ModelEntry(spec) for name, spec in catalog.items()}
        self._tokenizer_pool = ThreadPoolExecutor(
            config.tokenizer_workers, thread_name_prefix="sie-tokenize"
        )
        self._prep_pool = ThreadPoolExecutor(1, thread_name_prefix="sie-prep")
        self._closed = False

    # ---- lookups ---------------------------------------------------------------------------
    def entries(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelNotFound(f"Model '{name}' not found", model=name) from None

    def require_task(self, name: str, task: str) -> ModelSpec:
        """The spec of a model whose adapter family serves ``task`` (else InvalidInput)."""
        entry = self.entry(name)
        if entry.tasks is None:  # resolved once; adapter modules import no torch at import time
            entry.tasks = adapter_class(entry.spec.adapter).tasks
        if task not in entry.tasks:
            raise InvalidInput(f"model {name} does not support {task}", model=name)
        return entry.spec

    def ready(self, name: str) -> tuple[ModelAdapter, BatchExecutor]:
        """The loaded model, or a retryable ModelLoading after starting its load."""
        if self._closed:
            raise ShuttingDown("server is shutting down", model=name)
        entry = self.entry(name)
        if entry.state is ModelState.LOADED:
            assert entry.adapter is not None
            assert entry.executor is not None
            return entry.adapter, entry.executor
        if (
            entry.state is ModelState.FAILED
            and time.monotonic() - entry.failed_at < self.config.load_retry_s
        ):
            raise ModelLoadFailed(f"loading {name} failed: {entry.error}", model=name)
        if entry.state is not ModelState.LOADING:
            self.start_load(name)
        raise ModelLoading(f"model {name} is loading; retry shortly", model=name)

    # ---- entry points ----------------------------------------------------------------------
    async def encode(self, model: str, call: EncodeCall) -> EncodeOutcome:
        self.require_task(model, "encode")
        adapter, executor = self.ready(model)
        outcome = await run_encode(
            adapter,
            executor,
            call,
            tokenizer_pool=self._tokenizer_pool,
            postprocess_pool=self._tokenizer_pool,
        )
        self.metrics.inc(
            "sie_tokens_processed_total", sum(i.num_tokens for i in outcome.items), model=model
        )
        return outcome

    # ---- loading -----------------------------------------------------------------------------
    def start_load(self, name: str) -> asyncio.Task[None]:
        entry = self.entry(name)
        if entry.load_task is None or entry.load_task.done():
            entry.state = ModelState.LOADING
            entry.error = None
            entry.load_task = asyncio.get_running_loop().create_task(
                self._load(entry), name=f"sie-load-{name}"
            )
        return entry.load_task

    async def load(self, name: str) -> None:
        """Load now (preload); raise ModelLoadFailed when it fails."""
        await self.start_load(name)
        entry = self.entry(name)
        if entry.state is not ModelState.LOADED:
            raise ModelLoadFailed(f"loading {name} failed: {entry.error}", model=name)

    async def _load(self, entry: ModelEntry) -> None:
        spec = entry.spec
        started = time.perf_counter()
        executor = BatchExecutor(
            spec.name,
            self._executor_config(spec),
            self._prep_pool,
            run_context=_inference_mode,
            on_batch=lambda stats: self._record_batch(spec.name, stats),
        )
        executor.start()
        try:
            adapter = create_adapter(spec)
            target = LoadTarget(
                spec.weights_source(), self.config.placement.device, self.config.placement.dtype
            )
            await executor.call(lambda: adapter.load(target))
            if self.config.warmup:
                await executor.call(lambda: _warm_up(adapter, spec))
        except Exception as exc:
            log.exception("loading %s failed", spec.name)
            await executor.close()
            entry.state, entry.error, entry.failed_at = (
                ModelState.FAILED,
                f"{type(exc).__name__}: {exc}",
                time.monotonic(),
            )
            self.metrics.inc("sie_model_load_failures_total", model=spec.name)
            return
        entry.adapter, entry.executor = adapter, executor
        entry.memory_bytes = adapter.memory_bytes()
        entry.state = ModelState.LOADED
        log.info(
            "loaded %s on %s in %.1fs", spec.name, target.device, time.perf_counter() - started
        )

    def _executor_config(self, spec: ModelSpec) -> ExecutorConfig:
        base = self.config.executor
        return dataclasses.replace(
            base,
            max_batch_tokens=spec.max_batch_tokens or base.max_batch_tokens,
            max_batch_items=spec.max_batch_items or base.max_batch_items,
        )

    def _record_batch(self, model: str, stats: BatchStats) -> None:
        self.metrics.inc("sie_batches_total", model=model, status="ok" if stats.ok else "error")
        self.metrics.observe("sie_batch_size", stats.items, BATCH_SIZE_BUCKETS, model=model)
        self.metrics.inc("sie_batch_tokens_total", stats.tokens, model=model)
        self.metrics.inc("sie_batch_padded_tokens_total", stats.padded_tokens, model=model)

    async def close(self) -> None:
        """Stop every executor (queued work fails with ShuttingDown; running batches finish)."""
        self._closed = True
        for entry in self._entries.values():
            if entry.load_task is not None and not entry.load_task.done():
                entry.load_task.cancel()
            if entry.executor is not None:
                await entry.executor.close()
                if entry.adapter is not None:
                    entry.adapter.unload()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)


def _inference_mode() -> AbstractContextManager[Any]:
    import torch

    return torch.inference_mode()


def _warm_up(adapter: ModelAdapter, spec: ModelSpec) -> None:
    """One tiny forward pass per default output type, so the first request pays no lazy init."""
    profile = spec.profile(None)
    settings = EncodeSettings(output_types=profile.output_types, options=dict(profile.options))
    runner = EncodeRunner(adapter, settings)
    runner.run(runner.collate(adapter.prepare([InputItem(text="warm up")], settings)))
