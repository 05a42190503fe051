"""Request options: profile selection, merging, and typed reads that fail with ``InvalidInput``
naming the offending key.

Options arrive as a free-form mapping (``options`` in every request). The catalog profile's
options come first and the request's override them. A key that neither the task nor the model's
adapter accepts is refused: silently ignoring a typo (``treshold``) would return results the
caller did not ask for.
"""

from __future__ import annotations

import math
import string
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from sie_server.catalog import ModelSpec, ProfileSpec
from sie_server.errors import InvalidInput

#: Placeholders each template may use ("" is a positional ``{}``).
TEMPLATE_FIELDS: Mapping[str, frozenset[str]] = {
    "query_template": frozenset({"text"}),
    "document_template": frozenset({"text"}),
    "instruction_template": frozenset({"instruction", "text"}),
    "hypothesis_template": frozenset({""}),
}


def select_profile(spec: ModelSpec, options: Mapping[str, Any]) -> ProfileSpec:
    """The profile named by ``options["profile"]``, or the model's default one."""
    name = options.get("profile")
    if name is None:
        return spec.profile(None)
    if not isinstance(name, str) or name not in spec.profiles:
        known = ", ".join(sorted(spec.profiles))
        raise InvalidInput(
            f"unknown profile {name!r} for {spec.name} (profiles: {known})", model=spec.name
        )
    return spec.profile(name)


class Options:
    """Profile options overlaid with request options, read with type checks."""

    __slots__ = ("model", "values")

    def __init__(self, values: Mapping[str, Any], model: str) -> None:
        self.values: dict[str, Any] = dict(values)
        self.model = model

    @classmethod
    def resolve(
        cls, spec: ModelSpec, request: Mapping[str, Any], accepted: Collection[str]
    ) -> tuple[ProfileSpec, Options]:
        """The profile's options overlaid with the request's. A profile serves every task of the
        model, so its keys this task does not read are left out here (the catalog check at
        startup refused keys no task reads); the request's keys are checked against
        ``accepted``, naming the first unknown one."""
        profile = select_profile(spec, request)
        merged = {k: v for k, v in profile.options.items() if k in accepted}
        merged.update(request)
        merged.pop("profile", None)
        options = cls(merged, spec.name)
        options.check_known(accepted)
        options.check_templates()
        return profile, options

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def _error(self, message: str) -> InvalidInput:
        return InvalidInput(message, model=self.model)

    # ---- checks ------------------------------------------------------------------------------
    def check_known(self, accepted: Collection[str]) -> None:
        unknown = sorted(k for k in self.values if k not in accepted)
        if "lora_id" in unknown:
            raise self._error(
                f"model {self.model} cannot take LoRA adapters (option 'lora_id'; the dense "
                "family takes them)"
            )
        if unknown:
            known = ", ".join(sorted(accepted)) or "none"
            raise self._error(
                f"unknown option {unknown[0]!r} for model {self.model} (accepted: {known})"
            )

    def check_templates(self) -> None:
        """Every template present uses only its own placeholders (and parses)."""
        for key, allowed in TEMPLATE_FIELDS.items():
            if key in self.values:
                check_template(self.text(key), allowed, key=key, model=self.model)

    # ---- typed reads -----------------------------------------------------------------------------
    def without(self, keys: Iterable[str]) -> dict[str, Any]:
        drop = set(keys)
        return {k: v for k, v in self.values.items() if k not in drop}

    def text(self, key: str, default: str | None = None) -> str:
        value = self.values.get(key, default)
        if not isinstance(value, str):
            raise self._error(f"option {key!r} must be a string, got {_kind(value)}")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.values.get(key) is None else self.text(key)

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            raise self._error(f"option {key!r} must be true or false, got {_kind(value)}")
        return value

    def optional_flag(self, key: str) -> bool | None:
        return None if self.values.get(key) is None else self.flag(key, False)

    def number(
        self, key: str, default: float, *, lo: float | None = None, hi: float | None = None
    ) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self._error(f"option {key!r} must be a number, got {_kind(value)}")
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise self._error(f"option {key!r} must be between {lo:g} and {hi:g}, got {value}")
        if lo is not None and value < lo:
            raise self._error(f"option {key!r} must be at least {lo:g}, got {value}")
        if hi is not None and value > hi:
            raise self._error(f"option {key!r} must be at most {hi:g}, got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: Collection[str]) -> str:
        value = self.values.get(key, default)
        if not isinstance(value, str) or value not in choices:
            raise self._error(
                f"option {key!r} must be one of {', '.join(sorted(choices))}, got {value!r}"
            )
        return value

    def text_list(self, key: str) -> list[str] | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self._error(f"option {key!r} must be a list of strings, got {_kind(value)}")
        return list(value)

    def mapping(self, key: str) -> Mapping[str, Any] | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self._error(f"option {key!r} must be a mapping, got {_kind(value)}")
        return value


def check_template(template: str, allowed: frozenset[str], *, key: str, model: str) -> None:
    """Raise InvalidInput unless ``template`` parses and uses only ``allowed`` placeholders."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise InvalidInput(f"option {key!r} is not a valid template: {exc}", model=model) from None
    bad = sorted(fields - allowed)
    if bad:
        names = ", ".join("{" + f + "}" for f in sorted(allowed))
        raise InvalidInput(
            f"option {key!r} uses placeholder {{{bad[0]}}}; it may only use {names}", model=model
        )


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
