"""sie_sdk.inputs.prepare_item: images (PIL, arrays, paths -> JPEG; bytes untouched, format from
magic bytes), documents (format from the path suffix; raw bytes need a format), the caller's item
left alone, the result accepted by the wire layer, and Pillow optional (not imported, clear error)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sie_sdk.convert import to_proto
from sie_sdk.inputs import (
    DOCUMENT_FORMATS,
    ImageSupportMissing,
    InputError,
    image_format,
    prepare_item,
)

SDK_ROOT = Path(__file__).resolve().parents[2] / "sdk"
RED = (200, 30, 40)


def decode(data: bytes) -> Image.Image:
    assert data[:3] == b"\xff\xd8\xff", "not JPEG bytes"
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


def only_image(item: dict[str, Any]) -> dict[str, Any]:
    images = prepare_item(item)["images"]
    assert len(images) == 1
    image: dict[str, Any] = images[0]
    assert set(image) == {"data", "format"}
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- images ---------------------------------------------------------------------------------
def test_a_pil_image_becomes_jpeg_of_the_same_size_and_colour() -> None:
    image = only_image({"images": [Image.new("RGB", (7, 5), RED)]})
    assert image["format"] == "jpeg"
    decoded = decode(image["data"])
    assert decoded.size == (7, 5)
    assert decoded.mode == "RGB"
    pixel = decoded.getpixel((3, 2))
    assert isinstance(pixel, tuple)
    assert all(abs(a - b) <= 6 for a, b in zip(pixel, RED, strict=True))  # JPEG, quality 95


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK"])
def test_other_modes_are_converted_to_rgb(mode: str) -> None:
    source = Image.new("RGB", (4, 3), RED).convert(mode)
    decoded = decode(only_image({"images": [{"data": source}]})["data"])
    assert (decoded.size, decoded.mode) == ((4, 3), "RGB")


def test_grayscale_stays_grayscale() -> None:
    decoded = decode(only_image({"images": [Image.new("L", (3, 3), 128)]})["data"])
    assert (decoded.size, decoded.mode) == ((3, 3), "L")
    pixel = decoded.getpixel((1, 1))
    assert isinstance(pixel, int)
    assert abs(pixel - 128) <= 2


def test_a_given_format_does_not_survive_conversion() -> None:
    # The hint must describe the bytes sent, which are JPEG.
    image = only_image({"images": [{"data": Image.new("RGB", (2, 2)), "format": "png"}]})
    assert image["format"] == "jpeg"


@pytest.mark.parametrize(
    ("shape", "mode"), [((5, 7, 3), "RGB"), ((5, 7, 4), "RGB"), ((5, 7), "L"), ((5, 7, 1), "L")]
)
def test_numpy_arrays_become_jpeg(shape: tuple[int, ...], mode: str) -> None:
    array = np.full(shape, 90, dtype=np.uint8)
    image = only_image({"images": [array]})
    assert image["format"] == "jpeg"
    decoded = decode(image["data"])
    assert decoded.size == (7, 5)  # PIL reports (width, height) of an (H, W, ...) array
    assert decoded.mode == mode


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), r"got shape \(4, 4, 2\)"),
        (np.zeros(4, dtype=np.uint8), r"got shape \(4,\)"),
    ],
)
def test_bad_arrays_are_refused(array: np.ndarray[Any, Any], message: str) -> None:
    with pytest.raises(InputError, match=rf"images\[0\]: .*{message}"):
        prepare_item({"images": [array]})


@pytest.mark.parametrize("as_str", [True, False])
def test_a_path_is_read_and_converted_to_jpeg(tmp_path: Path, as_str: bool) -> None:
    path = tmp_path / "photo.png"
    Image.new("RGBA", (6, 4), (*RED, 255)).save(path)
    source: str | Path = str(path) if as_str else path
    for value in (source, {"data": source}, {"data": source, "format": "png"}):
        image = only_image({"images": [value]})
        assert image["format"] == "jpeg"
        decoded = decode(image["data"])
        assert (decoded.size, decoded.mode) == ((6, 4), "RGB")


def test_a_missing_or_unreadable_path_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        prepare_item({"images": [tmp_path / "absent.jpg"]})
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(InputError, match=r"images\[0\]: .*notes.jpg is not an image"):
        prepare_item({"images": [str(not_an_image)]})


def test_bytes_pass_through_untouched() -> None:
    raw = png_bytes(Image.new("RGB", (3, 3), RED))
    image = only_image({"images": [raw]})
    assert image["data"] is raw
    assert image["format"] == "png"
    given = only_image({"images": [{"data": raw, "format": "custom"}]})
    assert given["data"] is raw
    assert given["format"] == "custom"
    view = memoryview(raw)
    assert only_image({"images": [{"data": view}]})["data"] is view


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00", "png"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", ""),
        (b"GIF89a", ""),
        (b"", ""),
    ],
)
def test_image_format_from_magic_bytes(data: bytes, expected: str) -> None:
    assert image_format(data) == expected
    assert only_image({"images": [{"data": data, "format": ""}]})["format"] == expected


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ("photo.jpg", "images must be a list, got str"),
        ([{"format": "jpeg"}], r"images\[0\] needs a 'data' field"),
        ([{"data": b"x", "format": 3}], r"images\[0\].format must be a string"),
        ([b"ok", 42], r"images\[1\] must be a PIL image, .* got int"),
        ([{"data": {"nested": 1}}], r"images\[0\].data must be a PIL image"),
    ],
)
def test_bad_images_are_refused(images: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        prepare_item({"images": images})


# ---- documents ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "pdf"),
        ("letter.docx", "docx"),
        ("old.doc", "doc"),
        ("page.HTM", "html"),
        ("page.xhtml", "html"),
        ("notes.markdown", "md"),
        ("notes.md", "md"),
        ("plain.txt", "txt"),
        ("table.csv", "csv"),
        ("deck.pptx", "pptx"),
    ],
)
def test_document_format_comes_from_the_suffix(tmp_path: Path, name: str, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"content of " + name.encode())
    for value in ({"data": path}, {"data": str(path)}, path):
        document = prepare_item({"document": value})["document"]
        assert document == {"data": b"content of " + name.encode(), "format": expected}


def test_every_reference_suffix_is_known() -> None:
    suffixes = ".pdf .docx .doc .html .htm .xhtml .md .markdown .txt .rtf .odt .pptx .xlsx .csv"
    assert set(DOCUMENT_FORMATS) == set(suffixes.split())


def test_a_given_document_format_wins(tmp_path: Path) -> None:
    path = tmp_path / "export.bin"
    path.write_bytes(b"%PDF-1.7")
    document = prepare_item({"document": {"data": path, "format": "pdf"}})["document"]
    assert document == {"data": b"%PDF-1.7", "format": "pdf"}
    with pytest.raises(InputError, match=r"cannot infer a format from 'export.bin'; pass format"):
        prepare_item({"document": {"data": path}})


def test_document_bytes_need_a_format() -> None:
    raw = b"%PDF-1.7 ..."
    document = prepare_item({"document": {"data": raw, "format": "pdf"}})["document"]
    assert document["data"] is raw
    assert document["format"] == "pdf"
    for value in ({"data": raw}, {"data": raw, "format": ""}, raw):
        with pytest.raises(InputError, match=r"document.format is required with raw bytes"):
            prepare_item({"document": value})


def test_errors_can_name_the_item() -> None:
    with pytest.raises(InputError, match=r"^items\[3\]\.images\[1\] must be a PIL image"):
        prepare_item({"images": [b"ok", 42]}, where="items[3]")
    with pytest.raises(InputError, match=r"^items\[3\]\.document\.format is required"):
        prepare_item({"document": b"raw"}, where="items[3]")
    with pytest.raises(InputError, match=r"^items\[3\] must be a mapping"):
        prepare_item([], where="items[3]")  # type: ignore[arg-type]


def test_bad_documents_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="document needs a 'data' field"):
        prepare_item({"document": {"format": "pdf"}})
    with pytest.raises(InputError, match=r"document\.data must be bytes or a file path, got int"):
        prepare_item({"document": {"data": 7, "format": "pdf"}})
    with pytest.raises(FileNotFoundError):
        prepare_item({"document": tmp_path / "absent.pdf"})


# ---- the item as a whole --------------------------------------------------------------------
def test_the_callers_item_is_not_mutated_and_other_keys_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_text("# hi")
    multivector = np.ones((2, 4), dtype=np.float32)
    metadata = {"k": [1, 2]}
    item: dict[str, Any] = {
        "id": "x",
        "text": "caption",
        "images": [Image.new("RGB", (2, 2)), {"data": b"\x89PNG...."}],
        "document": {"data": path},
        "multivector": multivector,
        "metadata": metadata,
        "unknown": object(),
    }
    before = copy.copy(item)
    images_before = list(item["images"])
    out = prepare_item(item)
    assert out is not item
    assert item == before  # same keys, same objects
    assert item["images"] == images_before
    assert item["document"] == {"data": path}
    assert out["images"] is not item["images"]
    assert out["images"][1] == {"data": b"\x89PNG....", "format": "png"}
    assert out["document"] == {"data": b"# hi", "format": "md"}
    for key in ("id", "text", "multivector", "metadata", "unknown"):
        assert out[key] is item[key]


def test_items_without_images_or_documents_are_copied_as_they_are() -> None:
    item = {"text": "t", "images": None, "document": None}
    out = prepare_item(item)
    assert out == item
    assert out is not item
    with pytest.raises(InputError, match="an item must be a mapping, got str"):
        prepare_item("t")  # type: ignore[arg-type]


def test_the_wire_layer_accepts_a_prepared_item(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("body")
    raw = png_bytes(Image.new("RGB", (2, 2)))
    item = prepare_item(
        {"id": "i", "images": [raw, np.zeros((3, 3, 3), dtype=np.uint8)], "document": path}
    )
    message = to_proto.item(item, "item")
    assert [image.format for image in message.images] == ["png", "jpeg"]
    assert message.images[0].data == raw
    assert decode(message.images[1].data).size == (3, 3)
    assert (message.document.data, message.document.format) == (b"body", "txt")


# ---- Pillow is optional ---------------------------------------------------------------------
def test_without_pillow_conversion_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import ...` fail
    with pytest.raises(ImageSupportMissing, match=r"pip install 'sie\[images\]'") as caught:
        prepare_item({"images": [np.zeros((2, 2, 3), dtype=np.uint8)]})
    assert isinstance(caught.value, ImportError)
    with pytest.raises(ImageSupportMissing, match=r"images\[0\]: .*needs Pillow"):
        prepare_item({"images": [tmp_path / "x.png"]})
    # Bytes and documents need no Pillow.
    document = tmp_path / "a.txt"
    document.write_text("t")
    out = prepare_item({"images": [b"\xff\xd8\xff"], "document": document})
    assert out["images"] == [{"data": b"\xff\xd8\xff", "format": "jpeg"}]
    assert out["document"]["format"] == "txt"


def test_importing_inputs_does_not_import_pil() -> None:
    script = (
        "import sys, sie_sdk.inputs, sie_sdk.scoring\n"
        "from sie_sdk.inputs import prepare_item\n"
        "prepare_item({'images': [b'\\x89PNG'], 'text': 't'})\n"
        "print(sorted(m for m in sys.modules if m == 'PIL' or m.startswith('PIL.')))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SDK_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
