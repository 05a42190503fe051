"""A deterministic, controllable model for engine and server tests: no torch, no weights.

Use it directly (``FakeAdapter(spec)``) or through a catalog entry::

    adapter: tests.fakes:FakeAdapter
    weights_path: <any existing folder>
    outputs: {dense: {dims: 2}}
    load_options: {delay_s: 0.1, fail_word: boom, oom_above: 4}

* Tokens: ``[BOS, one id per whitespace word, EOS]``, so an item costs its word count + 2.
* Output: one dense float32 vector ``[token count, sum of ids]`` per item (``expected_vector``).
* ``delay_s`` sleeps in every forward pass; ``fail_word`` makes a batch holding that word raise
  ``RuntimeError``; ``oom_above`` makes a batch of more than N items raise ``OutOfMemoryError``;
  ``load_waits: true`` makes the load wait for ``FakeAdapter.load_gate``.
* ``hold()`` / ``release()`` park forward passes on a gate (deterministic saturation);
  ``passes_started`` counts passes that entered the model, ``passes`` logs the finished ones.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from sie_server.adapters.base import Encoder, require_texts
from sie_server.catalog import ModelSpec
from sie_server.domain import F32, EncodeOutput, InputItem, LoadTarget, TokenizedText
from sie_server.tasks.encode import TEMPLATE_KEYS, EncodeSettings, format_text

BOS, EOS = 1, 2
VOCAB = 30000
#: A held pass gives up after this long, so a broken test fails instead of hanging.
GATE_TIMEOUT_S = 30.0


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError``: the engine recognises OOM by class name."""


def word_id(word: str) -> int:
    return 3 + zlib.crc32(word.encode()) % VOCAB


def token_ids(text: str, max_length: int | None = None) -> tuple[list[int], bool]:
    """(ids with BOS/EOS, truncated) as the fake tokenizer produces them."""
    ids = [BOS, *(word_id(w) for w in text.split())]
    truncated = max_length is not None and len(ids) + 1 > max_length
    if max_length is not None:
        ids = ids[: max(max_length - 1, 1)]
    return [*ids, EOS], truncated


def expected_vector(text: str, max_length: int | None = None) -> F32:
    ids, _ = token_ids(text, max_length)
    return np.array([len(ids), sum(ids)], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class FakeInputs:
    """A collated batch: the texts (for the log) and their ids."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class ForwardPass:
    """One forward pass the model ran: its items and how it ended ("ok", "error", "oom")."""

    texts: tuple[str, ...]
    outcome: str
    #: The thread that ran it.
    thread: str = ""
    #: When it started and ended (``time.monotonic()``).
    started: float = 0.0
    ended: float = 0.0
    #: The torch (OpenMP) threads its thread had.
    threads: int = 0


class FakeAdapter(Encoder[TokenizedText]):
    output_types: ClassVar[frozenset[str]] = frozenset({"dense"})
    #: Loads started, by model name, over the process's life.
    loads: ClassVar[Counter[str]] = Counter()
    #: What a model with ``load_waits`` waits for in its load (open unless a test closes it).
    load_gate: ClassVar[threading.Event] = threading.Event()
    encode_options = TEMPLATE_KEYS

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        opts = dict(self.load_options)
        self.delay_s = float(opts.get("delay_s", 0.0))
        fail_word = opts.get("fail_word")
        self.fail_word: str | None = str(fail_word) if fail_word is not None else None
        oom_above = opts.get("oom_above")
        self.oom_above: int | None = int(oom_above) if oom_above is not None else None
        #: What ``memory_bytes`` reports once loaded (``memory_mb``; 0 by default).
        self.weight_bytes = int(float(opts.get("memory_mb", 0)) * 2**20)
        self.load_waits = bool(opts.get("load_waits", False))
        #: Whether its passes may run side by side (``concurrent``; no by default).
        self.concurrent = bool(opts.get("concurrent", False))
        self.loaded = False
        self._lock = threading.Lock()
        self._passes: list[ForwardPass] = []
        self._started = 0
        self._gate = threading.Event()
        self._gate.set()

    # ---- control and observation (any thread) ------------------------------------------------
    def hold(self) -> None:
        """Park every forward pass that starts from now on until ``release``."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    @property
    def passes_started(self) -> int:
        with self._lock:
            return self._started

    @property
    def passes(self) -> list[ForwardPass]:
        with self._lock:
            return list(self._passes)

    def seen_texts(self) -> set[str]:
        """Every text that reached the model, whatever its pass's outcome."""
        return {text for p in self.passes for text in p.texts}

    # ---- the adapter contract ------------------------------------------------------------------
    def load(self, target: LoadTarget) -> None:
        FakeAdapter.loads[self.spec.name] += 1
        if self.load_waits and not FakeAdapter.load_gate.wait(GATE_TIMEOUT_S):
            raise RuntimeError("fake model's load was held too long")
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def concurrent_passes(self) -> bool:
        return self.concurrent

    def memory_bytes(self) -> int:
        return self.weight_bytes if self.loaded else 0

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        out = []
        for text in texts:
            ids, truncated = token_ids(text, self.max_length)
            out.append(TokenizedText(ids, truncated=truncated, extra=text))
        return out

    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[TokenizedText]:
        texts = require_texts(items, self.spec.name)
        return self.tokenize([format_text(t, settings) for t in texts])

    def collate_encode(self, payloads: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        return FakeInputs(
            texts=tuple(str(t.extra) for t in payloads),
            ids=tuple(tuple(t.input_ids) for t in payloads),
        )

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        assert isinstance(inputs, FakeInputs)
        started = time.monotonic()
        with self._lock:
            self._started += 1
        if not self._gate.wait(GATE_TIMEOUT_S):
            raise RuntimeError("fake model was held too long")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_word is not None and any(
            self.fail_word in text.split() for text in inputs.texts
        ):
            self._record(inputs, "error", started)
            raise RuntimeError(f"fake model refuses {self.fail_word!r}")
        if self.oom_above is not None and len(inputs.ids) > self.oom_above:
            self._record(inputs, "oom", started)
            raise OutOfMemoryError(f"fake model: {len(inputs.ids)} items > {self.oom_above}")
        self._record(inputs, "ok", started)
        return [
            EncodeOutput(dense=np.array([len(ids), sum(ids)], dtype=np.float32))
            for ids in inputs.ids
        ]

    def _record(self, inputs: FakeInputs, outcome: str, started: float) -> None:
        thread, ended = threading.current_thread().name, time.monotonic()
        threads = torch.get_num_threads()
        with self._lock:
            self._passes.append(ForwardPass(inputs.texts, outcome, thread, started, ended, threads))


FakeAdapter.load_gate.set()
