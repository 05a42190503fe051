"""The model registry: catalog entries, their lifecycle, and the engine's entry points.

States: available -> loading -> loaded, or -> failed; loaded -> unloading -> available. A request
for an available model starts a background load and is answered ``ModelLoading`` (retryable) at
once; however many ask at once, the model loads once (one load task per model). ``--preload``
awaits the load at startup. A failed load answers ``ModelLoadFailed`` and is retried by the first
request after ``load_retry_s``.

Memory (``engine/memory.py``): under a budget, loading a model first evicts the least recently
used loaded models. An evicted model stops admitting (``ModelNotLoaded``, retryable), its queued
work completes (for up to ``evict_drain_s``; what is left then fails with ``ShuttingDown``,
retryable), it unloads on its own thread, and the next request loads it again.

LoRA adapters: a call whose options name ``lora_id`` is checked before anything loads (the family
takes LoRA, the catalog allows the adapter: else InvalidInput); which adapters of a loaded model
are resident, and when they load and go, is ``engine/loras.py``; the peft work is
``adapters/lora.py``.

Names: a request names a catalog model, or ``<catalog name>:<profile>`` (catalog names never
contain ``:``), which is the same model with that profile selected, as if ``options.profile`` were
set (``resolve`` gives a ``ModelRef``). The variant shares the catalog model's entry: one load,
one executor, metrics under the catalog name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sie_server.adapters.base import (
    Encoder,
    Extractor,
    ModelAdapter,
    Scorer,
    tasks_of,
)
from sie_server.adapters.lora import LoraSupport, check_allowed, lora_id_of
from sie_server.adapters.onnx_engine import resolve_engine
from sie_server.adapters.registry import adapter_class
from sie_server.catalog import Catalog, CatalogError, ModelSpec
from sie_server.device import Placement
from sie_server.domain import InputItem, Job, LoadTarget
from sie_server.engine import heap
from sie_server.engine.compute_lane import ComputeLane
from sie_server.engine.executor import BatchExecutor, BatchStats, ExecutorConfig
from sie_server.engine.loras import LoraResidency
from sie_server.engine.memory import process_gauge, weight_files_bytes, weights_gauge
from sie_server.engine.openmp import serial_openmp
from sie_server.engine.pipeline import Outcome, run_job
from sie_server.engine.warmup import check_profiles, warm_up
from sie_server.errors import (
    InvalidInput,
    ModelLoadFailed,
    ModelLoading,
    ModelNotFound,
    ModelNotLoaded,
    ShuttingDown,
    shortened,
)
from sie_server.observability.metrics import BATCH_SIZE_BUCKETS, Metrics, record_timing
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.encode import EncodeCall, EncodedItem, check_response_size
from sie_server.tasks.extract import ExtractCall, ExtractedItem
from sie_server.tasks.images import decode_items, has_images
from sie_server.tasks.score import RankedScore, ScoreCall, rank

log = logging.getLogger(__name__)
R = TypeVar("R")


class ModelState(enum.Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    UNLOADING = "unloading"


@dataclass(slots=True)
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.AVAILABLE
    adapter: ModelAdapter | None = None
    executor: BatchExecutor | None = None
    error: str | None = None
    failed_at: float = 0.0
    #: Loads tried since the model last loaded (reset by a successful load).
    load_attempts: int = 0
    #: When a request last asked for it (monotonic): the eviction order.
    last_used: float = 0.0
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    memory_bytes: int = 0
    #: The adapter family's class and the tasks the model serves with it (its catalog tasks
    #: that the family implements), resolved once (adapter modules import no torch).
    adapter_class: type[ModelAdapter] | None = None
    served: tuple[str, ...] = ()
    #: The loaded model's LoRA adapters (None unless loaded by a family that takes them).
    loras: LoraResidency | None = None


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model name as a client sent it, resolved: the catalog entry, and the profile that a
    ``<name>:<profile>`` variant selects (None for a plain catalog name)."""

    name: str
    entry: ModelEntry
    profile: str | None = None

    @property
    def spec(self) -> ModelSpec:
        return self.entry.spec

    def options(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The request's options with the variant's profile selected; ``options.profile``
        naming another profile is InvalidInput."""
        options = dict(request)
        if self.profile is None:
            return options
        given = options.get("profile")
        if given is not None and given != self.profile:
            raise InvalidInput(
                f"model {self.name} selects profile {self.profile!r}, but options.profile is "
                f"{given!r}",
                model=self.name,
            )
        options["profile"] = self.profile
        return options


@dataclass(frozen=True, slots=True)
class EngineConfig:
    executor: ExecutorConfig
    placement: Placement
    tokenizer_workers: int = 2
    #: A lone request of one text up to this many characters is prepared and finished on the
    #: event loop (``ModelRegistry._run``); 0: always in the pools.
    inline_max_chars: int = 1000
    #: Threads decoding and preprocessing requests that carry images (tasks/images.py).
    image_workers: int = 1
    #: The request limits (the image decoder reads its pixel limit from them).
    limits: RequestLimits = field(default_factory=RequestLimits)
    load_retry_s: float = 30.0
    warmup: bool = True
    #: The largest response the transport can send (the server's --max-message-bytes).
    max_response_bytes: int = 64 * 1024 * 1024
    #: ``--engine``: auto (each catalog entry's), torch or onnx (see onnx_engine.resolve_engine).
    engine: str = "auto"
    #: ``--memory-budget-mb`` in bytes (0: no budget) and the gauge it bounds (memory.GAUGES).
    memory_budget_bytes: int = 0
    memory_gauge: str = "process"
    #: How long an evicted model's queued work gets to complete.
    evict_drain_s: float = 30.0
    #: LoRA adapters kept resident per model (least recently used evicted past it).
    max_loras_per_model: int = 4
    #: Every model's forward passes on one compute lane (the CPU), or one lane per model
    #: (a GPU); model_thread.py says why.
    shared_compute_thread: bool = False
    #: The shared lane's workers and its torch threads (0: leave them as they are); under load
    #: its workers split the threads (compute_lane.py says why).
    compute_workers: int = 1
    compute_threads: int = 0


class ModelRegistry:
    def __init__(
        self, catalog: Catalog, config: EngineConfig, metrics: Metrics | None = None
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.metrics = metrics or Metrics()
        self._entries = {name: ModelEntry(spec) for name, spec in catalog.items()}
        # Helper threads run torch's operators serially (openmp.py says why).
        self._tokenizer_pool = ThreadPoolExecutor(
            config.tokenizer_workers, thread_name_prefix="sie-tokenize", initializer=serial_openmp
        )
        self._image_pool = ThreadPoolExecutor(
            config.image_workers, thread_name_prefix="sie-image", initializer=serial_openmp
        )
        #: Requests inside ``_run`` now, every model's (0: an arriving request is alone).
        self._running = 0
        self._prep_pool = ThreadPoolExecutor(
            1, thread_name_prefix="sie-prep", initializer=serial_openmp
        )
        self._lane = (
            ComputeLane(
                "sie-compute",
                config.compute_workers,
                wide_threads=config.compute_threads,
                narrow_threads=config.compute_threads // config.compute_workers,
            )
            if config.shared_compute_thread
            else None
        )
        self._closed = False
        self._room = asyncio.Lock()
        self._gauge = (
            weights_gauge(
                lambda: (e.memory_bytes for e in self._entries.values() if e.adapter is not None)
            )
            if config.memory_gauge == "weights"
            else process_gauge(config.placement.device)
        )

    # ---- lookups ---------------------------------------------------------------------------
    def busy_lanes(self) -> list[tuple[str, str, float]]:
        """Each compute lane running a job: (lane, what it runs, since when, monotonic)."""
        lanes = {} if self._lane is None else {id(self._lane): self._lane}
        for entry in self._entries.values():
            if entry.executor is not None:
                lanes.setdefault(id(entry.executor.lane), entry.executor.lane)
        busy = []
        for lane in lanes.values():
            job = lane.busy  # read once: the lane's thread may clear it meanwhile
            if job is not None:
                since, what = job
                busy.append((lane.name, what, since))
        return busy

    def entries(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        """The catalog entry of ``name`` (a catalog name or a ``<name>:<profile>`` variant)."""
        return self.resolve(name).entry

    def resolve(self, name: str) -> ModelRef:
        """``name`` as a catalog model, else as ``<catalog name>:<profile>``: ModelNotFound when
        no such catalog model, InvalidInput (listing the profiles) when no such profile."""
        found = self._entries.get(name)
        if found is not None:
            return ModelRef(name, found)
        base, colon, profile = name.partition(":")
        found = self._entries.get(base) if colon else None
        if found is None:
            raise ModelNotFound(f"Model '{shortened(name)}' not found", model=name)
        if profile not in found.spec.profiles:
            known = ", ".join(sorted(found.spec.profiles))
            raise InvalidInput(
                f"unknown profile {shortened(profile)!r} in model name {shortened(name)!r} "
                f"(profiles of {base}: {known})",
                model=name,
            )
        return ModelRef(name, found, profile)

    def adapter_type(self, name: str) -> type[ModelAdapter]:
        """The model's adapter class; a catalog entry naming a missing family fails to load."""
        entry = self.entry(name)
        if entry.adapter_class is None:
            try:
                self._resolve(entry)
            except CatalogError as exc:
                raise ModelLoadFailed(str(exc), model=name) from None
        assert entry.adapter_class is not None
        return entry.adapter_class

    @staticmethod
    def _resolve(entry: ModelEntry) -> None:
        cls = adapter_class(entry.spec.adapter)
        entry.adapter_class = cls
        entry.served = tuple(t for t in entry.spec.tasks if t in tasks_of(cls))

    def check_catalog(self) -> None:
        """Startup check: every entry names an importable family, and every profile resolves for
        every task the model serves (CatalogError naming the file otherwise)."""
        for entry in self._entries.values():
            try:
                self._resolve(entry)
            except CatalogError as exc:
                raise CatalogError(f"{entry.spec.source_file or entry.spec.name}: {exc}") from None
            assert entry.adapter_class is not None
            if entry.spec.lora is not None and not issubclass(entry.adapter_class, LoraSupport):
                raise CatalogError(
                    f"{entry.spec.source_file or entry.spec.name}: lora: adapter family "
                    f"{entry.spec.adapter!r} cannot take LoRA adapters"
                )
            check_profiles(entry.spec, entry.adapter_class)

    def require_task(self, name: str, task: str) -> tuple[ModelRef, type[ModelAdapter]]:
        """The resolved name and adapter class of a model that serves ``task`` (else
        InvalidInput)."""
        ref = self.resolve(name)
        cls = self.adapter_type(ref.spec.name)
        entry = ref.entry
        if task not in entry.served:
            raise InvalidInput(
                f"model {name} does not support {task} (it supports {', '.join(entry.served) or 'nothing'})",
                model=name,
            )
        return ref, cls

    def ready(self, name: str) -> tuple[ModelAdapter, BatchExecutor]:
        """The loaded model, or a retryable ModelLoading after starting its load."""
        if self._closed:
            raise ShuttingDown("server is shutting down", model=name)
        entry = self.entry(name)
        entry.last_used = time.monotonic()
        if entry.state is ModelState.LOADED:
            assert entry.adapter is not None
            assert entry.executor is not None
            return entry.adapter, entry.executor
        if entry.state is ModelState.UNLOADING:
            raise ModelNotLoaded(
                f"model {name} is being unloaded to free memory; retry shortly", model=name
            )
        if entry.state is ModelState.FAILED:
            retry_in = entry.failed_at + self.config.load_retry_s - time.monotonic()
            if retry_in > 0:
                raise ModelLoadFailed(
                    f"{_failure(name, entry)}; the first request after {retry_in:.0f}s loads "
                    "it again",
                    model=name,
                )
        if entry.state is not ModelState.LOADING:
            self.start_load(name)
        raise ModelLoading(f"model {name} is loading; retry shortly", model=name)

    # ---- entry points ----------------------------------------------------------------------
    async def encode(
        self, model: str, call: EncodeCall, *, bulk: bool = False
    ) -> Outcome[list[EncodedItem]]:
        """``bulk``: a streamed request, whose items yield to interactive ones (batching.py)."""
        lora_id = self.lora_request(model, call.settings.options)
        adapter, executor = self.ready(model)
        assert isinstance(adapter, Encoder)
        spec, limit = adapter.spec, self.config.max_response_bytes
        images = has_images(call.items)

        def make_job() -> Job[list[EncodedItem]]:
            if not images:
                return adapter.encode_job(call)
            items = decode_items(call.items, model, self.config.limits)
            return adapter.encode_job(dataclasses.replace(call, items=items))

        with self.lora_pinned(model, lora_id):
            return await self._run(
                model,
                "encode",
                executor,
                make_job,
                call.deadline,
                check=lambda job: check_response_size(call, spec, job.tokens, limit),
                images=images,
                bulk=bulk,
                items=len(call.items),
                small=not bulk and self._one_short_text(call.items),
            )

    async def score(self, model: str, call: ScoreCall) -> Outcome[list[RankedScore]]:
        lora_id = self.lora_request(model, call.settings.options)
        adapter, executor = self.ready(model)
        assert isinstance(adapter, Scorer)
        images = has_images([call.query, *call.items])

        def make_job() -> Job[list[float]]:
            if not images:
                return adapter.score_job(call)
            limits = self.config.limits
            query = decode_items([call.query], model, limits, what="query")[0]
            items = decode_items(call.items, model, limits)
            return adapter.score_job(dataclasses.replace(call, query=query, items=items))

        with self.lora_pinned(model, lora_id):
            outcome = await self._run(
                model,
                "score",
                executor,
                make_job,
                call.deadline,
                images=images,
                items=len(call.items),
            )
        return Outcome(rank(outcome.result), outcome.timing, outcome.tokens)

    async def extract(self, model: str, call: ExtractCall) -> Outcome[list[ExtractedItem]]:
        adapter, executor = self.ready(model)
        assert isinstance(adapter, Extractor)
        return await self._run(
            model,
            "extract",
            executor,
            lambda: adapter.extract_job(call),
            call.deadline,
            items=len(call.items),
        )

    async def _run(
        self,
        model: str,
        endpoint: str,
        executor: BatchExecutor,
        make_job: Callable[[], Job[R]],
        deadline: float | None,
        check: Callable[[Job[R]], None] | None = None,
        images: bool = False,
        bulk: bool = False,
        items: int = 0,
        small: bool = False,
    ) -> Outcome[R]:
        """Run the job; a completed request records its tokens and one duration per phase. A
        request with images is decoded and prepared in the image pool. A ``small`` one that
        arrives while no other request is in the server is prepared and finished on the event
        loop: for one short text the two round trips to the tokenizer pool cost more than the
        work (about 0.8 ms of a 25 ms call on a 2-core host, docs/performance.md), and with
        nothing else in the server there is nobody for the loop to keep waiting."""
        inline = small and self._running == 0
        self._running += 1
        try:
            outcome = await run_job(
                executor,
                make_job,
                deadline=deadline,
                prepare_pool=self._image_pool if images else self._tokenizer_pool,
                bulk=bulk,
                finish_pool=self._tokenizer_pool,
                check=check,
                items=items,
                inline=inline,
            )
        finally:
            self._running -= 1
        self.metrics.inc("sie_tokens_processed_total", outcome.tokens, model=model)
        record_timing(self.metrics, outcome.timing, model=model, endpoint=endpoint)
        return outcome

    def _one_short_text(self, items: Sequence[InputItem]) -> bool:
        """One item of text alone, of at most ``inline_max_chars`` characters."""
        if len(items) != 1 or self.config.inline_max_chars <= 0:
            return False
        item = items[0]
        plain = not item.images and not item.token_ids and item.multivector is None
        return plain and item.text is not None and len(item.text) <= self.config.inline_max_chars

    # ---- LoRA adapters -------------------------------------------------------------------------
    def lora_request(self, name: str, options: Mapping[str, Any]) -> str | None:
        """The adapter a call's options name (None: the base model), checked before the model
        loads: its family must take LoRA and the catalog allow the adapter (else InvalidInput)."""
        lora_id = lora_id_of(options, name)
        if lora_id is None:
            return None
        spec = self.entry(name).spec
        if not issubclass(self.adapter_type(name), LoraSupport):
            raise InvalidInput(
                f"model {name} cannot take LoRA adapters (its family {spec.adapter!r} has none)",
                model=name,
            )
        check_allowed(spec, lora_id)
        return lora_id

    def lora_pinned(self, name: str, lora_id: str | None) -> AbstractContextManager[None]:
        """``lora_id`` kept resident while the request runs (``LoraResidency.pinned``); nothing
        for the base model."""
        if lora_id is None:
            return contextlib.nullcontext()
        residency = self.entry(name).loras
        assert residency is not None, "lora_request checked the family"
        return residency.pinned(lora_id)

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
            raise ModelLoadFailed(_failure(name, entry), model=name)

    async def _load(self, entry: ModelEntry) -> None:
        spec = entry.spec
        started = time.perf_counter()
        entry.load_attempts += 1
        executor = BatchExecutor(
            spec.name,
            self._executor_config(spec),
            self._prep_pool,
            run_context=_inference_mode,
            on_batch=lambda stats: self._record_batch(spec.name, stats),
            lane=self._lane,
        )
        executor.start()
        try:
            adapter = self.adapter_type(spec.name)(spec)
            adapter.check_spec()
            target = LoadTarget(
                spec.weights_source(),
                self.config.placement.device,
                self.config.placement.dtype,
                engine=resolve_engine(type(adapter), spec, self.config.engine),
            )
            need = entry.memory_bytes or weight_files_bytes(target.source)
            await self._make_room(entry, need)
            await executor.call_aside(lambda: adapter.load(target))
            executor.set_concurrency(adapter.concurrent_passes)
            loras = (
                await LoraResidency.open(
                    adapter,
                    executor,
                    self.config.max_loras_per_model,
                    self.config.load_retry_s,
                    on_change=functools.partial(self._remeasure, entry),
                )
                if isinstance(adapter, LoraSupport)
                else None
            )
            if self.config.warmup:
                await executor.call(functools.partial(warm_up, adapter, spec))
        except asyncio.CancelledError:
            # Shutdown (or a caller) cancelled the load: stop the model thread once its current
            # job ends, free what loaded, and leave the model loadable again, not LOADING.
            await executor.close(timeout_s=0.0)
            heap.release()
            entry.state, entry.error = ModelState.AVAILABLE, "the load was cancelled"
            raise
        except Exception as exc:
            log.exception("loading %s failed", spec.name)
            await executor.close()
            heap.release()
            entry.state, entry.error, entry.failed_at = (
                ModelState.FAILED,
                f"{type(exc).__name__}: {exc}",
                time.monotonic(),
            )
            self.metrics.inc("sie_model_load_failures_total", model=spec.name)
            return
        entry.adapter, entry.executor, entry.loras = adapter, executor, loras
        entry.memory_bytes = adapter.memory_bytes()
        entry.state, entry.load_attempts = ModelState.LOADED, 0
        entry.last_used = time.monotonic()
        heap.settle()
        log.info(
            "loaded %s on %s in %.1fs", spec.name, target.device, time.perf_counter() - started
        )
        await self._make_room(entry, 0)

    # ---- memory ------------------------------------------------------------------------------
    @staticmethod
    def _remeasure(entry: ModelEntry) -> None:
        """Re-read a loaded model's bytes (its LoRA adapters changed): the ``weights`` gauge of
        the memory budget counts them too."""
        if entry.adapter is not None:
            entry.memory_bytes = entry.adapter.memory_bytes()

    async def _make_room(self, keep: ModelEntry, need: int) -> None:
        """Evict the least recently used loaded models (never ``keep``) until the gauge plus
        ``need`` bytes fits the budget."""
        budget = self.config.memory_budget_bytes
        if budget <= 0:
            return
        async with self._room:
            while self._gauge() + need > budget:
                loaded = [
                    e
                    for e in self._entries.values()
                    if e.state is ModelState.LOADED and e is not keep
                ]
                if not loaded:
                    log.warning(
                        "memory budget %d MiB exceeded with only %s loaded",
                        budget // 2**20,
                        keep.spec.name,
                    )
                    return
                await self.evict(min(loaded, key=lambda e: e.last_used).spec.name)

    async def evict(self, name: str) -> None:
        """Unload a loaded model: refuse new work (retryable), let queued work complete, free
        its memory; the next request loads it again."""
        entry = self.entry(name)
        if entry.state is not ModelState.LOADED:
            return
        adapter, executor = entry.adapter, entry.executor
        assert adapter is not None
        assert executor is not None
        entry.state = ModelState.UNLOADING
        if entry.loras is not None:
            entry.loras.cancel()
            entry.loras = None
        log.info("evicting %s (least recently used) to stay within the memory budget", name)
        if not await executor.drained(self.config.evict_drain_s):
            log.warning("%s: queued work did not finish in %.0fs", name, self.config.evict_drain_s)
        await executor.call(adapter.unload)
        await executor.close()
        entry.adapter = entry.executor = None
        entry.state = ModelState.AVAILABLE
        del adapter, executor  # this frame's references too, or the collection cannot free it
        await asyncio.to_thread(heap.reclaim)
        self.metrics.inc("sie_model_evictions_total", model=name)

    def _executor_config(self, spec: ModelSpec) -> ExecutorConfig:
        base = self.config.executor
        return dataclasses.replace(
            base,
            max_batch_tokens=spec.max_batch_tokens or base.max_batch_tokens,
            max_batch_items=spec.max_batch_items or base.max_batch_items,
            batch_wait_ms=(
                base.batch_wait_ms if spec.batch_wait_ms is None else spec.batch_wait_ms
            ),
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
            if entry.loras is not None:
                entry.loras.cancel()
            if entry.executor is not None:
                await entry.executor.close()
                if entry.adapter is not None:
                    entry.adapter.unload()
        if self._lane is not None:
            await self._lane.stop(timeout_s=30.0)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self._image_pool.shutdown(wait=False, cancel_futures=True)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        heap.release()


def _failure(name: str, entry: ModelEntry) -> str:
    attempts = entry.load_attempts
    return (
        f"loading {name} failed ({attempts} attempt{'s' if attempts != 1 else ''}): {entry.error}"
    )


def _inference_mode() -> AbstractContextManager[Any]:
    import torch

    return torch.inference_mode()
