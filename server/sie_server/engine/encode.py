"""The encode pipeline of one request: resolve settings, prepare (tokenize) off the loop, batch,
convert.

Transport-agnostic: servicers turn protos into ``EncodeCall`` and ``EncodeOutcome`` back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sie_server.adapters.base import (
    EncodeOutput,
    EncodeSettings,
    InputItem,
    ModelAdapter,
    TokenizedText,
)
from sie_server.catalog import ModelSpec
from sie_server.catalog.spec import OUTPUT_TYPES
from sie_server.engine.executor import BatchExecutor
from sie_server.engine.output_dtype import OUTPUT_DTYPES, convert, sparse_dtype
from sie_server.errors import InvalidInput, SIEServerError


@dataclass(frozen=True, slots=True)
class EncodeCall:
    """One validated encode request."""

    items: Sequence[InputItem]
    settings: EncodeSettings
    output_dtype: str = "float32"
    deadline: float | None = None  # time.monotonic() seconds


@dataclass(frozen=True, slots=True)
class Timing:
    total_ms: float
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    postprocessing_ms: float


@dataclass(frozen=True, slots=True)
class SparseResult:
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.generic]
    dtype: str


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item's outputs in the requested dtype, with the tokens the model saw."""

    num_tokens: int
    truncated: bool
    dense: npt.NDArray[np.generic] | None = None
    sparse: SparseResult | None = None
    multivector: npt.NDArray[np.generic] | None = None


@dataclass(frozen=True, slots=True)
class EncodeOutcome:
    items: list[ItemResult]
    timing: Timing
    output_dtype: str


def resolve_settings(
    spec: ModelSpec,
    *,
    output_types: Sequence[str],
    instruction: str | None,
    is_query: bool | None,
    options: Mapping[str, Any],
    output_dtype: str,
) -> tuple[EncodeSettings, str]:
    """Merge the profile with the request; reject what the model cannot do (InvalidInput)."""
    options = dict(options)
    profile_name = options.pop("profile", None)
    if profile_name is not None and (
        not isinstance(profile_name, str) or profile_name not in spec.profiles
    ):
        known = ", ".join(sorted(spec.profiles))
        raise InvalidInput(
            f"unknown profile {profile_name!r} for {spec.name} (profiles: {known})", model=spec.name
        )
    profile = spec.profile(profile_name)
    types = tuple(dict.fromkeys(output_types)) or profile.output_types
    unknown = [t for t in types if t not in OUTPUT_TYPES]
    if unknown:
        raise InvalidInput(
            f"unknown output type(s) {', '.join(map(repr, unknown))} (known: {', '.join(OUTPUT_TYPES)})",
            model=spec.name,
        )
    missing = [t for t in types if t not in spec.outputs]
    if missing:
        raise InvalidInput(
            f"model {spec.name} does not produce {', '.join(missing)} (it produces {', '.join(spec.outputs)})",
            model=spec.name,
        )
    dtype = output_dtype or "float32"
    if dtype not in OUTPUT_DTYPES:
        raise InvalidInput(
            f"unknown output_dtype {dtype!r} (known: {', '.join(OUTPUT_DTYPES)})", model=spec.name
        )
    settings = EncodeSettings(
        output_types=types,
        is_query=bool(is_query),
        instruction=instruction or None,
        options={**profile.options, **options},
    )
    return settings, dtype


class EncodeRunner:
    """``BatchRunner`` for encode: the adapter's collate and forward under fixed settings."""

    def __init__(self, adapter: ModelAdapter, settings: EncodeSettings) -> None:
        self.adapter = adapter
        self.settings = settings

    def collate(self, payloads: Sequence[Any]) -> Any:
        return self.adapter.collate(payloads, self.settings)

    def run(self, inputs: Any) -> list[Any]:
        return list(self.adapter.encode_batch(inputs, self.settings))


async def run_encode(
    adapter: ModelAdapter,
    executor: BatchExecutor,
    call: EncodeCall,
    *,
    tokenizer_pool: Executor,
    postprocess_pool: Executor,
) -> EncodeOutcome:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    adapter.check_settings(call.settings)
    executor.check_capacity()

    tokens = await loop.run_in_executor(tokenizer_pool, adapter.prepare, call.items, call.settings)
    tokenized = time.perf_counter()

    work = executor.submit(
        [(t, t.cost) for t in tokens],
        key=("encode", call.settings.batch_key()),
        runner=EncodeRunner(adapter, call.settings),
        deadline=call.deadline,
    )
    gathered = await asyncio.gather(*(w.future for w in work), return_exceptions=True)
    outputs: list[EncodeOutput] = []
    for out in gathered:
        if isinstance(out, BaseException):
            raise out
        outputs.append(out)
    inferred = time.perf_counter()

    items = await loop.run_in_executor(
        postprocess_pool,
        _convert_all,
        outputs,
        tokens,
        call.settings.output_types,
        call.output_dtype,
    )
    done = time.perf_counter()
    batches = {w.timing.batch_id: w.timing.inference_ms for w in work}
    timing = Timing(
        total_ms=(done - started) * 1000.0,
        queue_ms=max((w.timing.queue_ms for w in work), default=0.0),
        tokenization_ms=(tokenized - started) * 1000.0,
        inference_ms=sum(batches.values()),
        postprocessing_ms=(done - inferred) * 1000.0,
    )
    return EncodeOutcome(items=items, timing=timing, output_dtype=call.output_dtype)


def _convert_all(
    outputs: Sequence[EncodeOutput],
    tokens: Sequence[TokenizedText],
    types: Sequence[str],
    dtype: str,
) -> list[ItemResult]:
    return [_convert(out, tok, types, dtype) for out, tok in zip(outputs, tokens, strict=True)]


def _convert(out: EncodeOutput, tok: TokenizedText, types: Sequence[str], dtype: str) -> ItemResult:
    def need(kind: str, value: Any) -> Any:
        if kind in types and value is None:
            raise SIEServerError(f"adapter produced no {kind} output")
        return value if kind in types else None

    dense = need("dense", out.dense)
    sparse = need("sparse", out.sparse)
    multivector = need("multivector", out.multivector)
    sparse_kind = sparse_dtype(dtype)
    return ItemResult(
        num_tokens=tok.cost,
        truncated=tok.truncated,
        dense=convert(dense, dtype) if dense is not None else None,
        sparse=SparseResult(sparse.indices, convert(sparse.values, sparse_kind), sparse_kind)
        if sparse is not None
        else None,
        multivector=convert(multivector, dtype) if multivector is not None else None,
    )
