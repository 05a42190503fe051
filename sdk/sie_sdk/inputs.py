"""Item preparation for the wire: the SDK's friendly image and document inputs -> bytes + format.

``prepare_item(item)`` returns a new dict in which every image is ``{"data": bytes, "format": str}``
and the document is ``{"data": bytes, "format": str}``, the shapes ``sie_sdk.convert.to_proto``
(and the HTTP API) expect. Invariants:

- The caller's item is never mutated: the result is a shallow copy with fresh ``images`` and
  ``document`` values; every other key (``text``, ``multivector`` arrays, ``metadata``, and unknown
  keys, which the wire layer rejects) is passed through as the same object.
- Images (each a bare value or ``{"data": value, "format"?: str}``):
  bytes-like values (``bytes``, ``bytearray``, ``memoryview``) are sent untouched with the given
  format, or the one their magic bytes show (JPEG ``FF D8 FF``, PNG ``89 50 4E 47``, WEBP
  ``RIFF....WEBP``), else ``""`` (unknown, the proto's empty hint). A ``PIL.Image``, a uint8 numpy
  array ``(H, W)`` / ``(H, W, C)`` with C in 1, 3, 4, or a ``str``/``Path`` file path is converted
  to JPEG (quality ``JPEG_QUALITY``, as the original SIE SDK) with format ``"jpeg"``, whatever format
  was given (the hint must describe the bytes sent). Modes RGB and L are encoded as they are; every
  other mode (RGBA, LA, P, CMYK, ...) is converted to RGB first. A path is always decoded and
  re-encoded, as the SDK reference says ("Loaded from file path", "converts them to JPEG"), even
  when the file is already a JPEG: the server gets one predictable format. (As in the original
  SDK, EXIF orientation is not applied: pixels are sent as stored.)
- Pillow is optional: importing this module never imports PIL. A PIL image is recognised through
  ``sys.modules`` (such an object cannot exist unless PIL is loaded); converting an array or a path
  without Pillow raises ``ImageSupportMissing`` (an ``ImportError``) naming
  ``pip install 'sie[images]'``.
- Documents (``{"data": bytes | str | Path, "format"?: str}`` or the bare data): a path is read and
  its format, unless given, comes from its suffix (``DOCUMENT_FORMATS``); bytes need an explicit
  format (``InputError`` asks for it). An unknown suffix without a format is an ``InputError`` too.
- A ``str`` image or document is always a file path (never base64: that is only the JSON wire's
  spelling of bytes). Reading files and encoding JPEGs is blocking work: async callers run
  ``prepare_item`` in a thread.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DOCUMENT_FORMATS",
    "JPEG_QUALITY",
    "ImageSupportMissing",
    "InputError",
    "image_format",
    "prepare_item",
]

#: JPEG quality for converted images (the original SIE SDK's default).
JPEG_QUALITY = 95

#: Document path suffix -> format hint (the SDK reference's list).
DOCUMENT_FORMATS: dict[str, str] = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".doc": "doc",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "md",
    ".markdown": "md",
    ".txt": "txt",
    ".rtf": "rtf",
    ".odt": "odt",
    ".pptx": "pptx",
    ".xlsx": "xlsx",
    ".csv": "csv",
}

_INSTALL_HINT = "pip install 'sie[images]'"
_BYTES_LIKE = (bytes, bytearray, memoryview)


class InputError(ValueError):
    """An item field the SDK cannot turn into wire bytes (the message names the field)."""


class ImageSupportMissing(ImportError):
    """Converting an image (PIL, numpy array or path) needs Pillow, which is not installed."""


def prepare_item(item: Mapping[str, Any], *, where: str = "") -> dict[str, Any]:
    """A new dict with images and the document as wire bytes; see the module docstring.

    ``where`` (e.g. ``"items[3]"``) prefixes the field names in error messages."""
    at = f"{where}." if where else ""
    if not isinstance(item, Mapping):
        raise InputError(f"{where or 'an item'} must be a mapping, got {type(item).__name__}")
    out = dict(item)
    images = out.get("images")
    if images is not None:
        if not isinstance(images, list | tuple):
            raise InputError(f"{at}images must be a list, got {type(images).__name__}")
        out["images"] = [
            _image(image, f"{at}images[{index}]") for index, image in enumerate(images)
        ]
    if out.get("document") is not None:
        out["document"] = _document(out["document"], f"{at}document")
    return out


def image_format(data: bytes | bytearray | memoryview) -> str:
    """``"jpeg"``, ``"png"`` or ``"webp"`` from the magic bytes, else ``""``."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return ""


# ---- images ---------------------------------------------------------------------------------
def _image(value: Any, where: str) -> dict[str, Any]:
    given: Any = None
    if isinstance(value, Mapping):
        if "data" not in value:
            raise InputError(f"{where} needs a 'data' field")
        given = value.get("format")
        if given is not None and not isinstance(given, str):
            raise InputError(f"{where}.format must be a string, got {type(given).__name__}")
        value = value["data"]
        where = f"{where}.data"
    if isinstance(value, _BYTES_LIKE):
        return {"data": value, "format": given or image_format(value)}
    return {"data": _jpeg(value, where), "format": "jpeg"}


def _pil_image(value: Any) -> bool:
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def _jpeg(value: Any, where: str) -> bytes:
    """JPEG bytes of a PIL image, a uint8 array or an image file."""
    if not (_pil_image(value) or isinstance(value, np.ndarray | str | os.PathLike)):
        raise InputError(
            f"{where} must be a PIL image, a numpy array, bytes or a file path, "
            f"got {type(value).__name__}"
        )
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImageSupportMissing(
            f"{where}: converting a PIL image, numpy array or image file to JPEG needs Pillow; "
            f"install it with {_INSTALL_HINT}"
        ) from exc
    if isinstance(value, Image.Image):
        return _encode(value)
    if isinstance(value, np.ndarray):
        return _encode(Image.fromarray(_pixels(value, where)))
    path = Path(value)
    try:
        with Image.open(path) as opened:
            return _encode(opened)
    except UnidentifiedImageError:
        raise InputError(f"{where}: {path} is not an image file Pillow can read") from None


def _pixels(array: np.ndarray[Any, Any], where: str) -> np.ndarray[Any, Any]:
    if array.dtype != np.uint8:
        raise InputError(f"{where}: image arrays must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(
            f"{where}: image arrays must be (H, W) or (H, W, C) with C in 1, 3, 4; "
            f"got shape {array.shape}"
        )
    return np.ascontiguousarray(array)


def _encode(image: Image.Image) -> bytes:
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---- documents ------------------------------------------------------------------------------
def _document(value: Any, where: str) -> dict[str, Any]:
    given: Any = None
    if isinstance(value, Mapping):
        if "data" not in value:
            raise InputError(f"{where} needs a 'data' field")
        given = value.get("format")
        if given is not None and not isinstance(given, str):
            raise InputError(f"{where}.format must be a string, got {type(given).__name__}")
        value = value["data"]
    if isinstance(value, _BYTES_LIKE):
        if not given:
            raise InputError(
                f"{where}.format is required with raw bytes (e.g. 'pdf', 'docx', 'html', 'md', "
                "'txt'); only a file path lets the SDK infer it"
            )
        return {"data": value, "format": given}
    if not isinstance(value, str | os.PathLike):
        raise InputError(f"{where}.data must be bytes or a file path, got {type(value).__name__}")
    path = Path(value)
    fmt = given or DOCUMENT_FORMATS.get(path.suffix.lower())
    if not fmt:
        raise InputError(
            f"{where}: cannot infer a format from {path.name!r}; pass format "
            f"(one of {', '.join(sorted(set(DOCUMENT_FORMATS.values())))})"
        )
    return {"data": path.read_bytes(), "format": fmt}
