"""What every task shares: the request limits and item checks, and hashable options (batch
keys)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sie_server.domain import InputItem
from sie_server.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may hold (server flags); above a limit, INVALID_INPUT naming it."""

    max_items: int = 1024
    #: Characters of one text (a query included).
    max_text_chars: int = 1_000_000
    #: Labels of one extract request.
    max_labels: int = 256
    #: Images of one item, encoded bytes of one image, and decoded pixels (width x height) of
    #: one image; a larger header is refused before any pixel is decoded (decompression bombs).
    max_images_per_item: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000


def as_limits(limits: RequestLimits | int) -> RequestLimits:
    """``limits``, where an int is ``max_items`` alone (the other limits at their defaults)."""
    return RequestLimits(max_items=limits) if isinstance(limits, int) else limits


def check_items(
    items: Sequence[InputItem],
    model: str,
    limits: RequestLimits | int,
    inputs: Sequence[str] = ("text",),
) -> None:
    """The request-level item checks every task shares; ``inputs`` is the catalog's list of what
    the model accepts ("text", "image")."""
    limits = as_limits(limits)
    if not items:
        raise InvalidInput("items must not be empty", model=model)
    if len(items) > limits.max_items:
        raise InvalidInput(
            f"{len(items)} items exceed the limit of {limits.max_items} per request", model=model
        )
    for index, item in enumerate(items):
        check_text(item, index, model, limits)
        check_images(item, index, model, limits, inputs)


def check_text(
    item: InputItem, index: int, model: str, limits: RequestLimits, what: str = "item"
) -> None:
    if item.text is not None and len(item.text) > limits.max_text_chars:
        raise InvalidInput(
            f"{what} {index}: text of {len(item.text)} characters exceeds the limit of "
            f"{limits.max_text_chars} (--max-text-chars); split it",
            model=model,
        )


def check_images(
    item: InputItem,
    index: int,
    model: str,
    limits: RequestLimits,
    inputs: Sequence[str] = ("text",),
    what: str = "item",
) -> None:
    """What can be checked of an item's images without decoding them: the model takes images at
    all, how many, and their encoded size."""
    if not item.images:
        return
    if "image" not in inputs:
        raise InvalidInput(f"{what} {index}: model {model} accepts text only", model=model)
    if len(item.images) > limits.max_images_per_item:
        raise InvalidInput(
            f"{what} {index}: {len(item.images)} images exceed the limit of "
            f"{limits.max_images_per_item} per item (--max-images-per-item)",
            model=model,
        )
    for position, image in enumerate(item.images):
        if len(image.data) > limits.max_image_bytes:
            raise InvalidInput(
                f"{what} {index}: image {position} has {len(image.data)} bytes, over the limit "
                f"of {limits.max_image_bytes} (--max-image-bytes)",
                model=model,
            )


def freeze(value: Any) -> Any:
    """A hashable, order-independent form of nested options (for batch keys)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value
