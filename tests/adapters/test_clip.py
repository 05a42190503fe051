"""The clip family (CLIP, SigLIP, SigLIP 2 dual encoders) run directly, the way the engine runs
it (``encode_job`` / ``score_job`` through ``run_inline``), against transformers computing the
same vectors in-process on the same saved tiny models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.base import Encoder
from sie_server.adapters.clip import DualEncoderAdapter, ImagePayload
from sie_server.catalog import CatalogError, ModelSpec
from sie_server.domain import ImageData, InputItem
from sie_server.engine.warmup import run_inline
from sie_server.errors import InternalError, InvalidInput, ModelLoadFailed
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.encode import EncodeCall, EncodedItem, EncodeSettings
from sie_server.tasks.images import decode_items
from sie_server.tasks.score import ScoreCall, ScoreSettings

from tests.harness import encoder, load_adapter, make_spec
from tests.tiny_models import clip
from tests.tiny_models.dense import build_backbone

TEXTS = [
    "a photo of a cat",
    "A red car parked on a narrow street, next to a bakery with a blue door and two bicycles.",
    "x",
    " ".join(["many words make a text longer than every text tower's positions"] * 12),
]
DOCUMENT = EncodeSettings(("dense",))
QUERY = EncodeSettings(("dense",), is_query=True)
MODELS = ("clip", "siglip", "siglip2")
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "clip": clip.build_tiny_clip,
    "siglip": clip.build_tiny_siglip,
    "siglip2": clip.build_tiny_siglip2,
}
DIMS = {"clip": clip.CLIP_DIMS, "siglip": clip.SIGLIP_DIMS, "siglip2": clip.SIGLIP_DIMS}
POSITIONS = {
    "clip": clip.CLIP_TEXT_POSITIONS,
    "siglip": clip.SIGLIP_TEXT_POSITIONS,
    "siglip2": clip.SIGLIP_TEXT_POSITIONS,
}
IMAGE_TOKENS = {
    "clip": clip.CLIP_IMAGE_TOKENS,
    "siglip": clip.SIGLIP_IMAGE_TOKENS,
    "siglip2": clip.SIGLIP2_IMAGE_TOKENS,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def spec_of(name: str, folder: Path, **fields: Any) -> ModelSpec:
    fields.setdefault("max_sequence_length", POSITIONS[name])
    return make_spec(f"tiny/{name}", "clip", folder, {"dense": DIMS[name]}, **fields)


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, DualEncoderAdapter]:
    loaded = {name: load_adapter(spec_of(name, folder)) for name, folder in folders.items()}
    assert all(isinstance(a, DualEncoderAdapter) for a in loaded.values())
    return {name: a for name, a in loaded.items() if isinstance(a, DualEncoderAdapter)}


# ---- helpers ----------------------------------------------------------------------------------
def pictures() -> list[Any]:
    """Images of different sizes and aspect ratios."""
    sizes = [(40, 50), (64, 48), (20, 20), (33, 90)]
    return [clip.random_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]


def image_item(*images: Any, fmt: str = "PNG", text: str | None = None) -> InputItem:
    """An item carrying ``images`` as ``fmt`` bytes, decoded as the engine's image pool does."""
    data = tuple(ImageData(clip.image_bytes(image, fmt), fmt.lower()) for image in images)
    return decode_items([InputItem(text=text, images=data)], "tiny", RequestLimits())[0]


def encode(
    adapter: Encoder[Any], items: Sequence[InputItem], settings: EncodeSettings = DOCUMENT
) -> list[EncodedItem]:
    """``encode_job`` run inline, as one batch per work group."""
    import torch

    with torch.inference_mode():
        result: list[EncodedItem] = run_inline(adapter.encode_job(EncodeCall(items, settings)))
    return result


def dense(results: Sequence[EncodedItem]) -> np.ndarray:
    return np.stack([np.asarray(r.dense, dtype=np.float32) for r in results])


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cosine = clip.cosines(got, want)
    assert (cosine >= 0.9999).all(), cosine


# ---- texts and images equal transformers ------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_the_saved_processors_reload_with_the_real_vocabulary(
    name: str, adapters: dict[str, DualEncoderAdapter]
) -> None:
    from transformers.image_processing_backends import PilBackend
    from transformers.utils.import_utils import is_torchvision_available

    adapter = adapters[name]
    assert len(adapter.tokenizer) == adapter.model.config.text_config.vocab_size == 30522
    # Loading picks torchvision's image processor where it is installed, else the PIL one.
    pil = isinstance(adapter.processor.image_processor, PilBackend)
    assert pil != is_torchvision_available()


@pytest.mark.parametrize("name", MODELS)
def test_texts_equal_transformers(
    name: str, adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    results = encode(adapters[name], [InputItem(text=t) for t in TEXTS])
    assert_close(dense(results), clip.reference_texts(folders[name], TEXTS))
    norms = np.linalg.norm(dense(results), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # Only the long text is cut; CLIP counts a text's own tokens, SigLIP the padded positions
    # its tower runs.
    assert [r.truncated for r in results] == [False, False, False, True]
    tokenizer = adapters[name].tokenizer
    own = [
        len(tokenizer(t, truncation=True, max_length=POSITIONS[name])["input_ids"]) for t in TEXTS
    ]
    want = own if name == "clip" else [POSITIONS[name]] * len(TEXTS)
    assert [r.num_tokens for r in results] == want


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_equal_transformers(
    name: str, fmt: str, adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    items = [image_item(image, fmt=fmt) for image in pictures()]
    results = encode(adapters[name], items)
    # The reference sees the same bytes, decoded by PIL.
    want = clip.reference_images(folders[name], [item.images[0].decoded for item in items])
    assert_close(dense(results), want)
    assert all(r.num_tokens == IMAGE_TOKENS[name] and not r.truncated for r in results)


@pytest.mark.parametrize("name", MODELS)
def test_a_mixed_request_gives_each_item_its_own_towers_vector_in_order(
    name: str, adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    images = pictures()[:2]
    items = [
        InputItem(text=TEXTS[0]),
        image_item(images[0]),
        InputItem(text=TEXTS[1]),
        image_item(images[1]),
    ]
    adapter = adapters[name]
    job = adapter.encode_job(EncodeCall(items, DOCUMENT))
    # One work group per tower: texts and images never share a forward pass.
    assert sorted(len(group.payloads) for group in job.groups) == [2, 2]
    assert len({group.key for group in job.groups}) == 2
    got = dense(encode(adapter, items))
    folder = folders[name]
    decoded = [items[1].images[0].decoded, items[3].images[0].decoded]
    assert_close(got[[0, 2]], clip.reference_texts(folder, TEXTS[:2]))
    assert_close(got[[1, 3]], clip.reference_images(folder, decoded))


@pytest.mark.parametrize("name", ["clip", "siglip2"])
def test_an_items_several_images_give_their_normalised_mean(
    name: str, adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    images = pictures()
    items = [image_item(images[0], images[1]), image_item(images[2])]
    results = encode(adapters[name], items)
    decoded = [image.decoded for image in items[0].images]
    want = np.stack(
        [
            clip.reference_item(folders[name], decoded),
            clip.reference_images(folders[name], [items[1].images[0].decoded])[0],
        ]
    )
    assert_close(dense(results), want)
    np.testing.assert_allclose(np.linalg.norm(dense(results), axis=1), 1.0, atol=1e-5)
    assert [r.num_tokens for r in results] == [2 * IMAGE_TOKENS[name], IMAGE_TOKENS[name]]


def test_an_item_with_text_and_an_image_is_the_images_vector(
    adapters: dict[str, DualEncoderAdapter],
) -> None:
    image = pictures()[0]
    captioned, plain = encode(
        adapters["clip"], [image_item(image, text="Description"), image_item(image)]
    )
    np.testing.assert_array_equal(captioned.dense, plain.dense)
    assert captioned.num_tokens == plain.num_tokens == clip.CLIP_IMAGE_TOKENS


def test_image_payloads_run_through_the_image_tower(
    adapters: dict[str, DualEncoderAdapter],
) -> None:
    adapter = adapters["clip"]
    text, image = adapter.prepare_encode([InputItem(text="a"), image_item(pictures()[0])], DOCUMENT)
    assert isinstance(image, ImagePayload)
    assert image.arrays["pixel_values"].dtype == np.float32
    assert image.arrays["pixel_values"].shape == (1, 3, clip.IMAGE_SIZE, clip.IMAGE_SIZE)
    assert (adapter.modality(text), adapter.modality(image)) == ("text", "image")


def test_templates_and_token_ids_apply_to_texts(
    adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    adapter = adapters["clip"]
    templated = EncodeSettings(("dense",), options={"document_template": "a photo of {text}"})
    got = dense(encode(adapter, [InputItem(text="a cat")], templated))
    assert_close(got, clip.reference_texts(folders["clip"], ["a photo of a cat"]))
    ids = adapter.tokenizer("a cat", add_special_tokens=False)["input_ids"]
    from_ids = dense(encode(adapter, [InputItem(token_ids=tuple(ids))]))
    assert_close(from_ids, clip.reference_texts(folders["clip"], ["a cat"]))


# ---- score: the base class's bi-encoder scoring, both directions ------------------------------
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_scores_are_cosines_between_texts_and_images(
    name: str, adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    import torch

    adapter, folder = adapters[name], folders[name]
    images = [image_item(image) for image in pictures()]
    decoded = [item.images[0].decoded for item in images]
    texts = [InputItem(text=t) for t in TEXTS[:3]]
    with torch.inference_mode():
        text_query = run_inline(adapter.score_job(ScoreCall(texts[0], images, ScoreSettings())))
        image_query = run_inline(adapter.score_job(ScoreCall(images[0], texts, ScoreSettings())))
    text_vectors = clip.reference_texts(folder, TEXTS[:3])
    image_vectors = clip.reference_images(folder, decoded)
    np.testing.assert_allclose(text_query, image_vectors @ text_vectors[0], atol=1e-5)
    np.testing.assert_allclose(image_query, text_vectors @ image_vectors[0], atol=1e-5)


# ---- options and precision --------------------------------------------------------------------
def test_normalize_false_gives_the_towers_raw_features(folders: dict[str, Path]) -> None:
    import torch

    adapter = encoder(
        load_adapter(spec_of("clip", folders["clip"], load_options={"normalize": False}))
    )
    image = image_item(pictures()[0])
    got = dense(encode(adapter, [InputItem(text=TEXTS[0]), image]))
    model, processor = clip.loaded(folders["clip"])
    with torch.inference_mode():
        text = model.get_text_features(**processor(text=[TEXTS[0]], return_tensors="pt"))
        pixels = processor(images=[image.images[0].decoded], return_tensors="pt")
        vision = model.get_image_features(**pixels)
    want = torch.cat([text.pooler_output, vision.pooler_output]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_a_non_boolean_normalize_is_a_catalog_error(folders: dict[str, Path]) -> None:
    with pytest.raises(CatalogError, match=r"load_options.normalize must be true or false"):
        load_adapter(spec_of("clip", folders["clip"], load_options={"normalize": "yes"}))


@pytest.mark.parametrize("name", ["clip", "siglip2"])
def test_bfloat16_runs_both_towers_in_the_models_dtype(name: str, folders: dict[str, Path]) -> None:
    adapter = load_adapter(spec_of(name, folders[name]), dtype="bfloat16")
    assert isinstance(adapter, DualEncoderAdapter)
    import torch

    assert adapter.model.dtype == torch.bfloat16
    images = pictures()[:2]
    items = [InputItem(text=TEXTS[0]), *(image_item(image) for image in images)]
    results = encode(adapter, items)
    assert all(r.dense is not None and r.dense.dtype == np.float32 for r in results)
    folder = folders[name]
    decoded = [item.images[0].decoded for item in items[1:]]
    want = np.concatenate(
        [clip.reference_texts(folder, TEXTS[:1]), clip.reference_images(folder, decoded)]
    )
    assert (clip.cosines(dense(results), want) > 0.98).all()


def test_memory_and_unload(
    adapters: dict[str, DualEncoderAdapter], folders: dict[str, Path]
) -> None:
    adapter = load_adapter(spec_of("clip", folders["clip"]))
    model, _ = clip.loaded(folders["clip"])
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    assert adapter.memory_bytes() >= parameters
    adapter.unload()
    assert adapter.memory_bytes() == 0


# ---- refusals ---------------------------------------------------------------------------------
def test_an_item_without_text_or_image_is_refused(adapters: dict[str, DualEncoderAdapter]) -> None:
    with pytest.raises(InvalidInput, match="item 1 has no text or image"):
        encode(adapters["clip"], [InputItem(text="a"), InputItem()])


def test_undecoded_images_are_an_internal_error(adapters: dict[str, DualEncoderAdapter]) -> None:
    raw = InputItem(images=(ImageData(clip.image_bytes(pictures()[0], "PNG"), "png"),))
    with pytest.raises(InternalError, match="item 0: an image was not decoded"):
        encode(adapters["clip"], [raw])


def test_catalog_dims_must_match_the_model(folders: dict[str, Path]) -> None:
    spec = make_spec("tiny/clip", "clip", folders["clip"], {"dense": 512}, max_sequence_length=77)
    with pytest.raises(CatalogError, match=r"outputs.dense.dims is 512, the model gives 16"):
        load_adapter(spec)


@pytest.mark.parametrize(
    ("name", "length", "rule"),
    [("clip", 78, "be at most the text tower's 77"), ("siglip", 32, "equal the text tower's 64")],
)
def test_max_sequence_length_must_fit_the_text_tower(
    name: str, length: int, rule: str, folders: dict[str, Path]
) -> None:
    with pytest.raises(CatalogError, match=rule):
        load_adapter(spec_of(name, folders[name], max_sequence_length=length))


def test_other_model_types_fail_the_load(tmp_path: Path) -> None:
    spec = make_spec("tiny/bert", "clip", build_backbone(tmp_path / "bert"), {"dense": 32})
    with pytest.raises(ModelLoadFailed, match="serves clip, siglip, siglip2 models, not 'bert'"):
        load_adapter(spec)


# ---- the image processor: the one loading picks, else PIL -------------------------------------
class BrokenProcessor:
    """A processor whose image path fails (as a torchvision build not matching torch would)."""

    def __init__(self, real: Any) -> None:
        self.tokenizer = real.tokenizer

    def __call__(self, **kwargs: Any) -> Any:
        raise RuntimeError("operator torchvision::resize does not exist")


def patch_processor_loading(
    monkeypatch: pytest.MonkeyPatch, broken: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """``AutoProcessor.from_pretrained`` returning a ``BrokenProcessor`` for the calls whose
    keyword arguments ``broken`` picks; the list records every call's keyword arguments."""
    from transformers import AutoProcessor

    real: Any = AutoProcessor.from_pretrained
    calls: list[dict[str, Any]] = []

    def load(source: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        processor = real(source, **kwargs)
        return BrokenProcessor(processor) if broken(kwargs) else processor

    monkeypatch.setattr(AutoProcessor, "from_pretrained", load)
    return calls


def test_a_processor_that_cannot_process_images_is_replaced_by_the_pil_one(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    folders: dict[str, Path],
) -> None:
    calls = patch_processor_loading(monkeypatch, lambda kwargs: "backend" not in kwargs)
    with caplog.at_level(logging.WARNING, logger="sie_server.adapters.hf"):
        adapter = load_adapter(spec_of("clip", folders["clip"]))
    assert calls == [{}, {"backend": "pil"}]
    assert "torchvision::resize" in caplog.text
    assert isinstance(adapter, DualEncoderAdapter)
    assert not isinstance(adapter.processor, BrokenProcessor)
    assert len(encode(adapter, [image_item(pictures()[0])])) == 1


def test_no_working_processor_fails_the_load(
    monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path]
) -> None:
    patch_processor_loading(monkeypatch, lambda kwargs: True)
    with pytest.raises(ModelLoadFailed, match=r"cannot load the processor .*PIL backend"):
        load_adapter(spec_of("clip", folders["clip"]))
