"""Image inputs before any model sees them: the checks made at validation (the model takes images,
how many, their encoded size) and decoding in the image pool (formats, corrupt and truncated
files, decompression bombs refused from the header)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from sie_server.domain import ImageData, InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks.common import RequestLimits, check_items
from sie_server.tasks.images import decode_image, decode_items, has_images

MODEL = "tiny-clip"
LIMITS = RequestLimits(max_images_per_item=2, max_image_bytes=50_000, max_image_pixels=100_000)


def encoded(fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose header announces ``width`` x ``height`` (a decompression bomb's
    header: the check must refuse it before decoding a pixel)."""
    data = bytearray(encoded("PNG", (8, 8), "L"))
    # The IHDR chunk: length (4) + b"IHDR" (4) at offset 8, then width, height, ...; CRC after 13.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_each_supported_format_decodes_to_rgb_of_its_size(fmt: str) -> None:
    image = decode_image(ImageData(encoded(fmt), fmt.lower()), "item 0: image 0", MODEL, LIMITS)
    assert (image.mode, image.size) == ("RGB", (24, 16))


def test_the_bytes_decide_the_format_not_the_hint() -> None:
    image = decode_image(ImageData(encoded("PNG"), "jpeg"), "item 0: image 0", MODEL, LIMITS)
    reference = Image.open(io.BytesIO(encoded("PNG"))).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_grayscale_becomes_rgb() -> None:
    image = decode_image(ImageData(encoded("PNG", mode="L")), "x", MODEL, LIMITS)
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "fmt", "expected"),
    [
        (b"", "", "is empty"),
        (b"definitely not an image", "", "is not a jpeg, png or webp image"),
        (encoded("GIF"), "", "is not a jpeg, png or webp image"),
        (encoded("PNG"), "tiff", "format 'tiff' is not supported"),
        (encoded("PNG")[:60], "png", "truncated"),
        (encoded("JPEG", (64, 64))[:300], "jpeg", "truncated"),
    ],
    ids=["empty", "garbage", "gif", "unknown-hint", "truncated-png", "truncated-jpeg"],
)
def test_bad_bytes_are_invalid_input_naming_the_image(data: bytes, fmt: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_image(ImageData(data, fmt), "item 3: image 1", MODEL, LIMITS)
    assert "item 3: image 1" in str(caught.value)
    assert expected in str(caught.value).lower()


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = png_declaring(10_000, 10_000)  # 100 megapixels: 300 MB decoded, from 140 bytes
    assert len(bomb) < 200
    with pytest.raises(InvalidInput) as caught:
        decode_image(ImageData(bomb, "png"), "item 0: image 0", MODEL, LIMITS)
    assert "10000x10000 pixels" in str(caught.value)
    assert "--max-image-pixels" in str(caught.value)


def test_a_header_past_pillows_own_bomb_limit_is_the_same_clear_error() -> None:
    bomb = png_declaring(60_000, 60_000)  # 3.6 gigapixels: Pillow itself refuses to open it
    with pytest.raises(InvalidInput) as caught:
        decode_image(ImageData(bomb, "png"), "item 0: image 0", MODEL, LIMITS)
    assert "too large" in str(caught.value)


def test_decode_items_fills_decoded_and_keeps_items_without_images() -> None:
    text = InputItem(text="a caption")
    with_image = InputItem(images=(ImageData(encoded("PNG")), ImageData(encoded("JPEG"))))
    decoded = decode_items([text, with_image], MODEL, LIMITS)
    assert decoded[0] is text
    assert [image.decoded.size for image in decoded[1].images] == [(24, 16), (24, 16)]
    assert with_image.images[0].decoded is None, "the caller's item is not changed"
    assert has_images(decoded)
    assert not has_images([text])


def test_decode_items_names_the_failing_item() -> None:
    items = [InputItem(images=(ImageData(encoded("PNG")),)), InputItem(images=(ImageData(b"x"),))]
    with pytest.raises(InvalidInput, match="query 1: image 0"):
        decode_items(items, MODEL, LIMITS, what="query")


@pytest.mark.parametrize(
    ("item", "inputs", "expected"),
    [
        (InputItem(images=(ImageData(b"x"),)), ("text",), "accepts text only"),
        (InputItem(images=(ImageData(b"x"),) * 3), ("text", "image"), "--max-images-per-item"),
        (InputItem(images=(ImageData(b"x" * 50_001),)), ("text", "image"), "--max-image-bytes"),
    ],
    ids=["text-only-model", "too-many", "too-many-bytes"],
)
def test_validation_refuses_before_decoding(
    item: InputItem, inputs: tuple[str, ...], expected: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_items([InputItem(text="ok"), item], MODEL, LIMITS, inputs)
    assert "item 1" in str(caught.value)
    assert expected in str(caught.value)


def test_validation_passes_images_within_the_limits() -> None:
    item = InputItem(images=(ImageData(b"x" * 50_000),) * 2)
    check_items([item], MODEL, LIMITS, ("text", "image"))
