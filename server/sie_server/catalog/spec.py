"""The catalog entry format (one YAML per model) and its validation.

```yaml
name: BAAI/bge-m3                  # the name clients use
hf_id: BAAI/bge-m3                 # hub id (HF cache, HF_HUB_OFFLINE honoured) ...
weights_path: ./bge-m3             # ... or a local folder (relative to the YAML file) ...
weights_package: pkg/model         # ... or a folder inside an installed Python package
adapter: bge_m3                    # adapter family (see sie_server.adapters.registry)
inputs: [text]
max_sequence_length: 8192
outputs:                           # what the model produces, with dims and similarity
  dense: {dims: 1024, similarity: cosine}   # truncatable: true for Matryoshka models
  sparse: {dims: 250002, similarity: dot}
  multivector: {dims: 1024, similarity: maxsim}
  # score: {}                      # a reranker's relevance score (no dims)
  # json: {}                       # extraction results: entities, classifications, ... (no dims)
tasks: [encode, score]             # optional; derived from the outputs when absent
load_options: {}                   # adapter load-time options (pooling, normalize, ...)
engine: torch                      # torch (default), onnx or onnx-int8 (ONNX Runtime, where the family has it)
profiles:                          # named presets, chosen with options.profile
  default: {output_types: [dense], options: {}}
default_profile: default           # optional; "default" or the first profile otherwise
max_batch_tokens: 16384            # optional per-model batching overrides
max_batch_items: 64
batch_wait_ms: 100                 # the arrival window (--batch-wait-ms) for this model; 0 = off
lora:                              # optional; LoRA adapters requests may name (options.lora_id)
  allowed: [org/adapter, /srv/loras/tenant-a]   # hub ids or local folders, matched verbatim
  allow_any: false                 # true: any adapter a request names (default false)
```

A key the format does not know, in an entry or a profile, is refused with the closest known one
(a misspelt key is never silently ignored).

Names never contain ``:``: ``<name>:<profile>`` is how a request selects a profile through the
model name. ``outputs.dense.truncatable: true`` marks a Matryoshka model, whose dense vectors may
be cut to their first N dims (and renormalized) with the encode ``dimensions`` parameter.

LoRA: a request's ``options.lora_id`` (or a profile's) names a peft adapter by hub id or local
folder. Only adapters listed in ``lora.allowed`` or named by a profile are served unless
``lora.allow_any`` is true: an arbitrary id lets a client make the server read any local folder
it can see, so that is the catalog author's explicit choice. Families that cannot take LoRA
refuse a ``lora`` section.

Weights are looked for in that order: ``weights_path``, then ``weights_package`` when that
package is installed, then ``hf_id``.

Tasks follow from the outputs unless listed: embedding outputs (dense, sparse, multivector) serve
``encode`` and also ``score`` (bi-encoder similarity); ``score`` serves ``score``; ``json`` serves
``extract``. The adapter must implement each task's capability (checked when it is resolved).
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sie_server.domain import ENGINES, MAX_BATCH_WAIT_MS

#: Outputs that are vectors (the encode task's output types).
OUTPUT_TYPES = ("dense", "sparse", "multivector")
#: Every output a catalog entry may declare: vectors, a reranker's score, extraction results.
ALL_OUTPUTS = (*OUTPUT_TYPES, "score", "json")
TASKS = ("encode", "score", "extract")
#: The keys a catalog entry may have (a misspelt one is an error, never silently ignored).
ENTRY_KEYS = (
    "name", "hf_id", "weights_path", "weights_package", "adapter", "inputs",
    "max_sequence_length", "outputs", "tasks", "load_options", "engine", "profiles",
    "default_profile", "max_batch_tokens", "max_batch_items", "batch_wait_ms", "lora",
)  # fmt: skip
PROFILE_KEYS = ("output_types", "options")
SIMILARITIES = ("cosine", "dot", "maxsim", "l2", "hamming")


class CatalogError(ValueError):
    """A catalog file is malformed; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class OutputSpec:
    #: None for outputs without a dimension (score, json).
    dims: int | None
    #: None for outputs that are not vectors.
    similarity: str | None
    #: A Matryoshka dense output: its first N dims, renormalized, are a valid embedding.
    truncatable: bool = False


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    output_types: tuple[str, ...]
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """The catalog's ``lora`` section: which adapters requests may name."""

    #: Hub ids or local folders, compared verbatim with ``options.lora_id``.
    allowed: tuple[str, ...] = ()
    #: Serve any adapter a request names (off: listed and profile adapters only).
    allow_any: bool = False


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    adapter: str
    max_sequence_length: int
    outputs: Mapping[str, OutputSpec]
    profiles: Mapping[str, ProfileSpec]
    default_profile: str
    inputs: tuple[str, ...] = ("text",)
    tasks: tuple[str, ...] = ("encode", "score")
    hf_id: str | None = None
    weights_path: Path | None = None
    weights_package: str | None = None
    load_options: Mapping[str, Any] = field(default_factory=dict)
    max_batch_tokens: int | None = None
    max_batch_items: int | None = None
    #: The arrival window of this model's batches (None: ``--batch-wait-ms``). Worth setting for
    #: a large model on a CPU, where a batch of 8 computes far more per text than one of 4.
    batch_wait_ms: float | None = None
    #: The engine of the forward pass (``--engine`` may override it).
    engine: str = "torch"
    #: The ``lora`` section (None: absent; profiles' adapters are still served).
    lora: LoraSpec | None = None
    source_file: Path | None = None

    def profile(self, name: str | None) -> ProfileSpec:
        """The named profile, or the default one when ``name`` is None."""
        return self.profiles[name or self.default_profile]

    @property
    def embedding_outputs(self) -> tuple[str, ...]:
        """The vector outputs (dense, sparse, multivector) this model produces, in catalog order."""
        return tuple(kind for kind in self.outputs if kind in OUTPUT_TYPES)

    def weights_source(self) -> str:
        """Where ``from_pretrained`` loads from: a local folder or a hub id."""
        if self.weights_path is not None:
            if not self.weights_path.is_dir():
                raise CatalogError(f"{self.name}: weights_path {self.weights_path} is not a folder")
            return str(self.weights_path)
        if self.weights_package is not None:
            local = _package_folder(self.weights_package)
            if local is not None:
                return str(local)
        if self.hf_id is not None:
            return self.hf_id
        raise CatalogError(
            f"{self.name}: package {self.weights_package!r} is not installed and no hf_id is set"
        )


def _package_folder(ref: str) -> Path | None:
    package, _, sub = ref.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(next(iter(found.submodule_search_locations))) / sub
    return folder if folder.is_dir() else None


def parse_spec(raw: Mapping[str, Any], source_file: Path | None = None) -> ModelSpec:
    """Validate one catalog entry; raise CatalogError naming the file and field."""
    where = str(source_file) if source_file else "<catalog>"

    def fail(msg: str) -> CatalogError:
        return CatalogError(f"{where}: {msg}")

    if not isinstance(raw, Mapping):
        raise fail("a catalog entry must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise fail("'name' must be a non-empty string")
    if ":" in name:
        raise fail(f"'name' {name!r} must not contain ':' (it selects a profile: <name>:<profile>)")
    _no_unknown_keys(raw, ENTRY_KEYS, "", fail)
    adapter = raw.get("adapter")
    if not isinstance(adapter, str) or not adapter:
        raise fail("'adapter' must be a non-empty string")
    max_len = raw.get("max_sequence_length")
    if not isinstance(max_len, int) or max_len <= 0:
        raise fail("'max_sequence_length' must be a positive integer")

    outputs_raw = raw.get("outputs")
    if not isinstance(outputs_raw, Mapping) or not outputs_raw:
        raise fail("'outputs' must map output types to {dims, similarity}")
    outputs: dict[str, OutputSpec] = {}
    for kind, out in outputs_raw.items():
        if kind not in ALL_OUTPUTS:
            raise fail(f"unknown output type {kind!r} (known: {', '.join(ALL_OUTPUTS)})")
        out = {} if out is None else out
        if not isinstance(out, Mapping):
            raise fail(f"outputs.{kind} must be a mapping")
        if kind not in OUTPUT_TYPES:
            if set(out) - {"dims"} or out.get("dims") is not None:
                raise fail(f"outputs.{kind} has no dims or similarity (write {kind}: {{}})")
            outputs[kind] = OutputSpec(dims=None, similarity=None)
            continue
        extra = sorted(set(out) - {"dims", "similarity", "truncatable"})
        if extra:
            raise fail(
                f"outputs.{kind} has unknown key {extra[0]!r} (dims, similarity, truncatable)"
            )
        if not isinstance(out.get("dims"), int) or out["dims"] <= 0:
            raise fail(f"outputs.{kind} needs a positive integer 'dims'")
        similarity = out.get("similarity", "cosine")
        if similarity not in SIMILARITIES:
            raise fail(f"outputs.{kind}.similarity must be one of {', '.join(SIMILARITIES)}")
        truncatable = out.get("truncatable", False)
        if not isinstance(truncatable, bool):
            raise fail(f"outputs.{kind}.truncatable must be true or false")
        if truncatable and kind != "dense":
            raise fail(f"outputs.{kind}.truncatable: only a dense output may be truncatable")
        outputs[kind] = OutputSpec(dims=out["dims"], similarity=similarity, truncatable=truncatable)
    tasks = _tasks(raw.get("tasks"), outputs, fail)

    profiles_raw = raw.get("profiles") or {"default": {"output_types": [next(iter(outputs))]}}
    if not isinstance(profiles_raw, Mapping):
        raise fail("'profiles' must be a mapping")
    profiles: dict[str, ProfileSpec] = {}
    for pname, prof in profiles_raw.items():
        prof = prof or {}
        if not isinstance(prof, Mapping):
            raise fail(f"profiles.{pname} must be a mapping with 'output_types' and/or 'options'")
        _no_unknown_keys(prof, PROFILE_KEYS, f"profiles.{pname}.", fail)
        types = tuple(prof.get("output_types") or (next(iter(outputs)),))
        unknown = [t for t in types if t not in outputs]
        if unknown:
            raise fail(f"profiles.{pname}.output_types has {unknown}, not among the outputs")
        options = prof.get("options") or {}
        if not isinstance(options, Mapping):
            raise fail(f"profiles.{pname}.options must be a mapping")
        profiles[str(pname)] = ProfileSpec(str(pname), types, dict(options))
    default_profile = raw.get("default_profile") or (
        "default" if "default" in profiles else next(iter(profiles))
    )
    if default_profile not in profiles:
        raise fail(f"default_profile {default_profile!r} is not among the profiles")

    weights_path = raw.get("weights_path")
    path: Path | None = None
    if weights_path is not None:
        path = Path(str(weights_path)).expanduser()
        if not path.is_absolute() and source_file is not None:
            path = (source_file.parent / path).resolve()
    hf_id = raw.get("hf_id")
    package = raw.get("weights_package")
    if path is None and hf_id is None and package is None:
        raise fail("one of 'hf_id', 'weights_path' or 'weights_package' is required")
    load_options = raw.get("load_options") or {}
    if not isinstance(load_options, Mapping):
        raise fail("'load_options' must be a mapping")
    engine = raw.get("engine", "torch")
    if engine not in ENGINES:
        raise fail(f"'engine' must be one of {', '.join(ENGINES)}, got {engine!r}")

    def optional_positive(key: str) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or value <= 0:
            raise fail(f"'{key}' must be a positive integer")
        return value

    batch_wait_ms = raw.get("batch_wait_ms")
    if batch_wait_ms is not None and (
        isinstance(batch_wait_ms, bool)
        or not isinstance(batch_wait_ms, int | float)
        or not 0 <= batch_wait_ms <= MAX_BATCH_WAIT_MS
    ):
        raise fail(
            f"'batch_wait_ms' must be a number of milliseconds from 0 to {MAX_BATCH_WAIT_MS}"
        )

    return ModelSpec(
        name=name,
        adapter=adapter,
        max_sequence_length=max_len,
        outputs=outputs,
        profiles=profiles,
        default_profile=str(default_profile),
        inputs=tuple(raw.get("inputs") or ("text",)),
        tasks=tasks,
        hf_id=str(hf_id) if hf_id is not None else None,
        weights_path=path,
        weights_package=str(package) if package is not None else None,
        load_options=dict(load_options),
        max_batch_tokens=optional_positive("max_batch_tokens"),
        max_batch_items=optional_positive("max_batch_items"),
        batch_wait_ms=None if batch_wait_ms is None else float(batch_wait_ms),
        engine=str(engine),
        lora=_lora(raw.get("lora"), fail),
        source_file=source_file,
    )


def _no_unknown_keys(
    raw: Mapping[str, Any], known: tuple[str, ...], where: str, fail: Callable[[str], CatalogError]
) -> None:
    """Refuse a key that is not in ``known``, naming the closest known one."""
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise fail(f"unknown key {where + str(key)!r}{hint}")


def _lora(raw: Any, fail: Callable[[str], CatalogError]) -> LoraSpec | None:
    """The ``lora`` section: ``allowed`` (non-empty strings) and ``allow_any`` (a boolean)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise fail("'lora' must be a mapping with 'allowed' and/or 'allow_any'")
    extra = sorted(set(raw) - {"allowed", "allow_any"})
    if extra:
        raise fail(f"lora has unknown key {extra[0]!r} (allowed, allow_any)")
    allowed = raw.get("allowed") or []
    if not isinstance(allowed, list) or not all(isinstance(a, str) and a for a in allowed):
        raise fail("lora.allowed must be a list of adapter ids (hub ids or local folders)")
    allow_any = raw.get("allow_any", False)
    if not isinstance(allow_any, bool):
        raise fail("lora.allow_any must be true or false")
    return LoraSpec(tuple(dict.fromkeys(allowed)), allow_any)


def _tasks(
    raw: Any, outputs: Mapping[str, OutputSpec], fail: Callable[[str], CatalogError]
) -> tuple[str, ...]:
    """The declared tasks, checked against the outputs, or the ones the outputs imply."""
    embeds = any(kind in OUTPUT_TYPES for kind in outputs)
    implied = tuple(
        task
        for task, served in (
            ("encode", embeds),
            ("score", embeds or "score" in outputs),
            ("extract", "json" in outputs),
        )
        if served
    )
    if raw is None:
        return implied
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise fail("'tasks' must be a non-empty list of task names")
    for task in raw:
        if task not in TASKS:
            raise fail(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        if task not in implied:
            needs = {
                "encode": "a dense, sparse or multivector output",
                "score": "a score or vector output",
                "extract": "a json output",
            }
            raise fail(f"task {task!r} needs {needs[task]}")
    return tuple(dict.fromkeys(raw))
