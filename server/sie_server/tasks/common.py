"""What every task shares: the request-level item checks and hashable options (batch keys)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sie_server.domain import InputItem
from sie_server.errors import InvalidInput


def check_items(items: Sequence[InputItem], model: str, max_items: int) -> None:
    """The request-level item checks every task shares."""
    if not items:
        raise InvalidInput("items must not be empty", model=model)
    if len(items) > max_items:
        raise InvalidInput(
            f"{len(items)} items exceed the limit of {max_items} per request", model=model
        )


def freeze(value: Any) -> Any:
    """A hashable, order-independent form of nested options (for batch keys)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value
