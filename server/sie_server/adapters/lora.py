"""Per-request LoRA adapters (peft) on a family's transformers model, never merged into it.

A request names an adapter with ``options.lora_id`` (a hub id, read through the HF cache with
``HF_HUB_OFFLINE`` honoured, or a local folder), directly or through a profile. The option is one
of the encode settings' options, so it is part of the batch key: items of different adapters never
share a forward pass. The engine (``engine/registry.py``) decides which adapters are resident and
when they load; this module does the work:

* ``LoraSupport``: the mixin a family inherits (the dense family does). A load has two steps:
  ``fetch_lora`` finds the adapter's files and reads its config (``fetch_adapter``: a hub id is
  downloaded into the HF cache), on any thread, touching no model, so that a download never holds
  up the batches of the thread the model computes on (on a CPU one thread serves every model);
  ``attach_lora`` then puts its weights into the model, on the model thread. ``unload_lora`` runs
  there too; the family's run hook wraps its forward pass in ``lora_active(settings.options)``,
  which selects the batch's adapter (or none) right before it.
* ``PeftAdapters``: peft's multi-adapter model around the family's own transformers model. The
  first adapter wraps it in a ``PeftModel``, which injects LoRA layers into its modules in place,
  so the family keeps calling its model as before; later adapters join with ``load_adapter``. A
  batch selects its adapter with ``set_adapter``; the base model runs under ``disable_adapter()``.
  Evicting deletes the adapter (``delete_adapter``); the last one out removes the LoRA layers
  (``unload``). Nothing is ever merged, so the base weights stay exact.
* ``lora_id_of`` and ``check_allowed``: the option's value and the catalog's policy (``lora`` in
  the model's YAML, see ``catalog/spec.py``).

Peft keys adapters by module name, which cannot hold ``.``: each adapter gets a short name
(``lora1``, ``lora2``, ...) and the ids map to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sie_server.adapters.base import ModelAdapter
from sie_server.catalog import ModelSpec
from sie_server.errors import InvalidInput, LoraLoading

#: The option key of the families that take LoRA adapters.
LORA_KEYS = frozenset({"lora_id"})


def lora_id_of(options: Mapping[str, Any], model: str) -> str | None:
    """The adapter ``options`` name (None: the base model); a value that is not a non-empty
    string is InvalidInput."""
    value = options.get("lora_id")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInput(
            f"option 'lora_id' must be a non-empty string (an adapter's hub id or folder), "
            f"got {value!r}",
            model=model,
        )
    return value


def profile_loras(spec: ModelSpec) -> tuple[str, ...]:
    """The adapters the model's profiles name, in profile order."""
    named = (profile.options.get("lora_id") for profile in spec.profiles.values())
    return tuple(dict.fromkeys(v for v in named if isinstance(v, str) and v))


def check_allowed(spec: ModelSpec, lora_id: str) -> None:
    """InvalidInput unless the catalog lists ``lora_id``, a profile names it, or the catalog
    allows any adapter (``lora.allow_any``)."""
    policy = spec.lora
    if policy is not None and (policy.allow_any or lora_id in policy.allowed):
        return
    profiles = profile_loras(spec)
    if lora_id in profiles:
        return
    listed = (*(policy.allowed if policy is not None else ()), *profiles)
    raise InvalidInput(
        f"LoRA adapter {lora_id!r} is not allowed for model {spec.name} (allowed: "
        f"{', '.join(listed) or 'none'}; the catalog's lora.allowed lists adapters, "
        "lora.allow_any: true serves any)",
        model=spec.name,
    )


def not_loaded(lora_id: str, model: str) -> LoraLoading:
    """A batch of an adapter that is not (or no longer) loaded: retryable, the engine loads it
    again for the retry."""
    return LoraLoading(
        f"LoRA adapter {lora_id!r} of model {model} is not loaded; retry shortly",
        lora=lora_id,
        model=model,
    )


#: The files of a saved peft adapter (``save_pretrained``; older adapters ship a ``.bin``).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True, slots=True)
class FetchedLora:
    """An adapter ready to attach: its local folder and its LoRA config (inference mode)."""

    folder: str
    config: Any


def fetch_adapter(lora_id: str) -> FetchedLora:
    """The adapter's files on this machine and its config (any thread; no model is touched).

    A folder is used as it is; any other id is a hub repo, downloaded into the HF cache (only the
    adapter's files; ``HF_HUB_OFFLINE`` honoured). Raises ``ValueError`` naming what is missing
    or wrong."""
    from peft import PeftConfig, PeftType

    folder = Path(lora_id).expanduser()
    if not folder.is_dir():
        if lora_id.startswith(("/", ".", "~")):
            raise ValueError(
                f"{lora_id} is not a folder (a local adapter needs adapter_config.json)"
            )
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(lora_id, allow_patterns=list(ADAPTER_FILES)))
    if not (folder / ADAPTER_FILES[0]).is_file():
        raise ValueError(f"{lora_id} has no adapter_config.json (is it a peft adapter?)")
    config = PeftConfig.from_pretrained(str(folder))
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"{lora_id} is a {config.peft_type.value} adapter, not LoRA")
    config.inference_mode = True
    return FetchedLora(str(folder), config)


class PeftAdapters:
    """The LoRA adapters loaded into one transformers model. Model thread only."""

    def __init__(self, model: Any, owner: str) -> None:
        self.model = model
        #: The catalog model, for messages.
        self.owner = owner
        #: The ``PeftModel`` around ``model`` while an adapter is loaded.
        self.peft: Any = None
        #: Adapter id -> peft adapter name.
        self.names: dict[str, str] = {}
        self._made = 0

    def load(self, lora_id: str, fetched: FetchedLora) -> None:
        """Attach ``lora_id`` (its ``fetch_adapter`` result) next to the others (a no-op when it
        is loaded). On failure nothing of it stays in the model; the exception says why."""
        if lora_id in self.names:
            return
        from peft import PeftModel

        self._made += 1
        name = f"lora{self._made}"
        try:
            if self.peft is None:
                self.peft = PeftModel(self.model, fetched.config, adapter_name=name)
            device = next(self.model.parameters()).device
            result = self.peft.load_adapter(
                fetched.folder, adapter_name=name, torch_device=str(device)
            )
            if result.missing_keys:
                raise ValueError(
                    f"{lora_id} has no weights for {len(result.missing_keys)} of the LoRA "
                    f"tensors its config asks for (e.g. {result.missing_keys[0]})"
                )
        except BaseException:
            self._discard(name)
            raise
        self.names[lora_id] = name

    def unload(self, lora_id: str) -> None:
        """Delete ``lora_id``'s weights (a no-op when it is not loaded)."""
        name = self.names.pop(lora_id, None)
        if name is not None:
            self._discard(name)

    def _discard(self, name: str) -> None:
        """Take adapter ``name`` out of the model: delete it, or, when it is the last one, remove
        the LoRA layers altogether (the base modules go back in place, unmerged)."""
        peft = self.peft
        if peft is None or name not in peft.peft_config:
            return
        others = [n for n in peft.peft_config if n != name]
        if not others:
            peft.unload()
            self.peft = None
            return
        if name in peft.active_adapters:  # deleting the active adapter would warn
            peft.set_adapter(others[0])
        peft.delete_adapter(name)

    @contextlib.contextmanager
    def active(self, lora_id: str | None) -> Iterator[None]:
        """Run the body with ``lora_id``'s adapter (None: the base model, adapters disabled)."""
        if lora_id is None:
            if self.peft is None:
                yield
                return
            with self.peft.disable_adapter():
                yield
            return
        name = self.names.get(lora_id)
        if name is None:  # evicted after its batch was formed: the caller retries
            raise not_loaded(lora_id, self.owner)
        if self.peft.active_adapters != [name]:
            self.peft.set_adapter(name)
        yield


class LoraSupport(ModelAdapter):
    """Mixin: per-request LoRA adapters for a family whose forward pass runs one transformers
    model (``self.model``). The family adds ``LORA_KEYS`` to its options and wraps its forward
    pass in ``lora_active``."""

    _loras: PeftAdapters | None = None

    def lora_unavailable(self) -> str | None:
        """Why this loaded model cannot take adapters (None: it can)."""
        if getattr(self, "model", None) is None:
            return "its forward pass runs no torch transformers model"
        return None

    def check_lora(self) -> None:
        """Raise ``InvalidInput`` when this loaded model cannot take adapters."""
        reason = self.lora_unavailable()
        if reason is not None:
            raise InvalidInput(
                f"model {self.spec.name} cannot take LoRA adapters: {reason}", model=self.spec.name
            )

    def fetch_lora(self, lora_id: str) -> FetchedLora:
        """An adapter's files and config (any thread: the model is not touched)."""
        self.check_lora()
        return fetch_adapter(lora_id)

    def attach_lora(self, lora_id: str, fetched: FetchedLora) -> None:
        """Put a fetched adapter into the model (model thread)."""
        self.check_lora()
        if self._loras is None:
            self._loras = PeftAdapters(getattr(self, "model", None), self.spec.name)
        self._loras.load(lora_id, fetched)

    def concurrent_passes(self) -> bool:
        """While an adapter is attached, each pass selects its own (``set_adapter``), so passes
        of this model must not overlap."""
        return super().concurrent_passes() and (self._loras is None or self._loras.peft is None)

    def unload_lora(self, lora_id: str) -> None:
        """Delete an adapter (model thread)."""
        if self._loras is not None:
            self._loras.unload(lora_id)

    def lora_active(self, options: Mapping[str, Any]) -> AbstractContextManager[None]:
        """The context a batch's forward pass runs in: the adapter its options name, or the base
        model (model thread)."""
        lora_id = lora_id_of(options, self.spec.name)
        if self._loras is None:
            if lora_id is None:
                return contextlib.nullcontext()
            raise not_loaded(lora_id, self.spec.name)
        return self._loras.active(lora_id)

    def unload(self) -> None:
        self._loras = None
        super().unload()
