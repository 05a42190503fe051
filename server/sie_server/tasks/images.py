"""Decoding image inputs: JPEG, PNG and WebP bytes -> RGB ``PIL.Image`` s, with limits.

The engine runs ``decode_items`` in its own image pool (``EngineConfig.image_workers``), never on
the event loop or the model thread, before a family's prepare step: families see
``ImageData.decoded`` and never parse bytes themselves. What needs no decoding (how many images,
their encoded size, whether the model takes images) was checked at validation
(``tasks.common.check_images``).

Every failure is an ``InvalidInput`` naming the item and the image:

* bytes that are no image, or a format other than JPEG, PNG and WebP;
* a truncated or corrupt file (the decoder's error is quoted);
* a header announcing more than ``max_image_pixels`` pixels, refused before any pixel is decoded,
  which is what stops a decompression bomb (a few KB of PNG announcing gigapixels).

Pillow is imported on first use (the ``images`` extra); without it an image request is refused
with the install hint instead of failing the server.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence
from typing import Any

from sie_server.domain import ImageData, InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks.common import RequestLimits

#: Formats accepted, as Pillow names them, by the hint a client may send.
FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def has_images(items: Sequence[InputItem]) -> bool:
    return any(item.images for item in items)


def decode_items(
    items: Sequence[InputItem], model: str, limits: RequestLimits, what: str = "item"
) -> list[InputItem]:
    """The items with every image decoded (``ImageData.decoded``); items without images are
    returned as they are."""
    out: list[InputItem] = []
    for index, item in enumerate(items):
        if not item.images:
            out.append(item)
            continue
        images = tuple(
            dataclasses.replace(
                image,
                decoded=decode_image(image, f"{what} {index}: image {position}", model, limits),
            )
            for position, image in enumerate(item.images)
        )
        out.append(dataclasses.replace(item, images=images))
    return out


def decode_image(image: ImageData, where: str, model: str, limits: RequestLimits) -> Any:
    """One image as an RGB ``PIL.Image.Image``; ``InvalidInput`` saying ``where`` and why."""
    Image = _pillow(model)
    if not image.data:
        raise InvalidInput(f"{where} is empty", model=model)
    # The format is only a hint: the bytes decide, as browsers and Pillow do.
    hint = image.format.lower()
    if hint and hint not in FORMATS:
        raise InvalidInput(
            f"{where}: format {image.format!r} is not supported (jpeg, png, webp)", model=model
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) past its own threshold; ours is checked
            # below from the header, so its warning is not an error here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(image.data), formats=sorted(set(FORMATS.values())))
    except Image.DecompressionBombError as exc:
        raise _too_large(where, model, limits, str(exc)) from None
    except Exception as exc:
        raise InvalidInput(
            f"{where} is not a JPEG, PNG or WebP image, or its header is cut ({_reason(exc)})",
            model=model,
        ) from None
    with opened:
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise InvalidInput(f"{where} has no pixels ({width}x{height})", model=model)
        if width * height > limits.max_image_pixels:
            raise _too_large(where, model, limits, f"{width}x{height} pixels")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened.load()
                rgb = opened.convert("RGB")
        except Exception as exc:
            raise InvalidInput(
                f"{where} could not be decoded ({_reason(exc)})", model=model
            ) from None
    return rgb


def _too_large(where: str, model: str, limits: RequestLimits, detail: str) -> InvalidInput:
    return InvalidInput(
        f"{where} is too large ({detail}; the limit is {limits.max_image_pixels} pixels, "
        "--max-image-pixels); resize it",
        model=model,
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _pillow(model: str) -> Any:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a server dependency
        raise InvalidInput(
            "this server cannot decode images: install Pillow (pip install 'sie[images]')",
            model=model,
        ) from None
    return Image
