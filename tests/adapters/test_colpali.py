"""ColPaliAdapter against transformers itself on tiny random checkpoints of both families it
serves (``ColPaliForRetrieval`` over PaliGemma, ``ColQwen2ForRetrieval`` over Qwen2-VL; see
``tests/tiny_models/colpali.py``): page images and query texts give the multivectors that
``model(**processor.process_images / process_queries(...)).embeddings`` gives for each input alone
(attended rows, cosine >= 0.9999 per row and 1e-5 apart), in batches of mixed sizes; scores
(``score_job`` through ``run_inline``) equal ``processor.score_retrieval``; items that are not
one text or one image are refused by index; the catalog entries and load checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.colpali import ColPaliAdapter, ColPaliPayload, stack_padded
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import BUILTIN_CATALOG_DIR, CatalogError, ModelSpec, load_catalog
from sie_server.catalog.spec import parse_spec
from sie_server.domain import EncodeOutput, ImageData, InputItem
from sie_server.engine.warmup import run_inline
from sie_server.errors import InvalidInput, ModelLoadFailed
from sie_server.tasks.encode import EncodeSettings
from sie_server.tasks.score import ScoreParams, resolve_score

from tests.harness import load_adapter
from tests.tiny_models.colpali import (
    DIM,
    IMAGE_TOKENS,
    build_tiny_colpali,
    build_tiny_colqwen2,
    load_reference,
    page_images,
    reference_multivectors,
    reference_scores,
)
from tests.tiny_models.dense import build_backbone

FAMILIES = ["colpali", "colqwen2"]
MAX_LEN = 64
DOCUMENT = EncodeSettings(output_types=("multivector",))
QUERY = EncodeSettings(output_types=("multivector",), is_query=True)
QUERIES = ["revenue?", "which quarter had the highest revenue in the table on this page"]
PAGES = page_images(4)


def colpali_spec(
    folder: Path,
    name: str = "tiny-colpali",
    *,
    dims: int = DIM,
    inputs: Sequence[str] = ("text", "image"),
    max_len: int = MAX_LEN,
) -> ModelSpec:
    return parse_spec(
        {
            "name": name,
            "adapter": "colpali",
            "weights_path": str(folder),
            "inputs": list(inputs),
            "max_sequence_length": max_len,
            "outputs": {"multivector": {"dims": dims, "similarity": "maxsim"}},
        }
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colpali")
    return {
        "colpali": build_tiny_colpali(root / "colpali"),
        "colqwen2": build_tiny_colqwen2(root / "colqwen2"),
    }


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, ModelAdapter]:
    return {family: load_adapter(colpali_spec(folder)) for family, folder in folders.items()}


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    return {family: load_reference(folder) for family, folder in folders.items()}


def colpali(adapter: ModelAdapter) -> ColPaliAdapter:
    assert isinstance(adapter, ColPaliAdapter)
    return adapter


def page_items(images: Sequence[Any]) -> list[InputItem]:
    """Items as the engine hands them to prepare: one decoded image each."""
    return [InputItem(images=(ImageData(b"", "png", decoded=image),)) for image in images]


def encode(
    adapter: ModelAdapter, items: Sequence[InputItem], settings: EncodeSettings = DOCUMENT
) -> list[EncodeOutput]:
    """prepare -> collate -> run, one batch (all items of one modality)."""
    import torch

    model = colpali(adapter)
    payloads = model.prepare_encode(items, settings)
    with torch.inference_mode():
        return model.run_encode(model.collate_encode(payloads, settings), settings)


def assert_same_rows(got: np.ndarray | None, want: np.ndarray) -> None:
    assert got is not None
    assert got.dtype == np.float32
    assert got.flags.c_contiguous
    assert got.shape == want.shape
    cosines = (got * want).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    )
    assert cosines.min() >= 0.9999
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---- encode against transformers ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pages_match_transformers(
    family: str, adapters: dict[str, ModelAdapter], references: dict[str, tuple[Any, Any]]
) -> None:
    outputs = encode(adapters[family], page_items(PAGES))
    expected = reference_multivectors(references[family], images=PAGES)
    for out, want in zip(outputs, expected, strict=True):
        assert_same_rows(out.multivector, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [QUERY, DOCUMENT], ids=["is_query", "not_is_query"])
def test_texts_are_encoded_as_queries_like_transformers(
    family: str,
    settings: EncodeSettings,
    adapters: dict[str, ModelAdapter],
    references: dict[str, tuple[Any, Any]],
) -> None:
    outputs = encode(adapters[family], [InputItem(text=t) for t in QUERIES], settings)
    expected = reference_multivectors(references[family], texts=QUERIES)
    for out, want in zip(outputs, expected, strict=True):
        assert_same_rows(out.multivector, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_unit_norm(family: str, adapters: dict[str, ModelAdapter]) -> None:
    items = [*page_items(PAGES[:2]), *(InputItem(text=t) for t in QUERIES)]
    for out in encode(adapters[family], items[:2]) + encode(adapters[family], items[2:]):
        assert out.multivector is not None
        assert out.multivector.shape[1] == DIM
        np.testing.assert_allclose(np.linalg.norm(out.multivector, axis=1), 1.0, atol=1e-5)


def test_colqwen2_pages_of_different_sizes_batch_together(
    adapters: dict[str, ModelAdapter], references: dict[str, tuple[Any, Any]]
) -> None:
    payloads = colpali(adapters["colqwen2"]).prepare_encode(page_items(PAGES), DOCUMENT)
    assert len({p.cost for p in payloads}) > 1, "the pages must get different token counts"
    # Pages padded to the largest page's patches and tokens give each page's own vectors.
    outputs = encode(adapters["colqwen2"], page_items(PAGES[::-1]))
    expected = reference_multivectors(references["colqwen2"], images=PAGES[::-1])
    for out, want in zip(outputs, expected, strict=True):
        assert_same_rows(out.multivector, want)


# ---- payloads: cost and modality -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_is_every_token_the_model_sees(
    family: str, adapters: dict[str, ModelAdapter], references: dict[str, tuple[Any, Any]]
) -> None:
    model = colpali(adapters[family])
    processor = references[family][0]
    items = [*page_items(PAGES), *(InputItem(text=t) for t in QUERIES)]
    payloads = model.prepare_encode(items, DOCUMENT)
    assert [model.modality(p) for p in payloads] == ["image"] * len(PAGES) + ["text"] * 2
    for page, payload in zip(PAGES, payloads[: len(PAGES)], strict=True):
        ids = processor.process_images([page])["input_ids"][0]
        assert payload.cost == len(ids)
        image_tokens = int((ids == processor.image_token_id).sum())
        if family == "colpali":
            assert image_tokens == IMAGE_TOKENS
        assert payload.cost > image_tokens, "the visual prompt's tokens count too"
    for text, payload in zip(QUERIES, payloads[len(PAGES) :], strict=True):
        assert payload.cost == int(processor.process_queries([text])["attention_mask"].sum())
        assert not payload.truncated


@pytest.mark.parametrize("family", FAMILIES)
def test_is_query_does_not_split_batches(family: str, adapters: dict[str, ModelAdapter]) -> None:
    model = colpali(adapters[family])
    assert model.encode_key(QUERY) == model.encode_key(DOCUMENT)
    assert model.encode_key(DOCUMENT) != model.encode_key(
        EncodeSettings(("multivector",), options={"x": 1})
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_query_is_cut_at_max_sequence_length(
    family: str, folders: dict[str, Path], references: dict[str, tuple[Any, Any]]
) -> None:
    import torch

    adapter = load_adapter(colpali_spec(folders[family], max_len=24))
    text = " ".join(["revenue"] * 40)
    (payload,) = colpali(adapter).prepare_encode([InputItem(text=text)], QUERY)
    assert payload.truncated
    assert payload.cost == 24
    # The first 24 tokens of the processor's query, as right truncation keeps them.
    processor, model = references[family]
    batch = processor.process_queries([text])
    assert payload.tokens["input_ids"].tolist() == batch["input_ids"][0][:24].tolist()
    cut = {k: v[:, :24] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if "token_type_ids" in batch:
        cut["token_type_ids"] = batch["token_type_ids"][:, :24]
    with torch.inference_mode():
        want = model(**cut).embeddings[0].numpy()
    (out,) = encode(adapter, [InputItem(text=text)], QUERY)
    assert_same_rows(out.multivector, want)


# ---- refused items -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            InputItem(text="q", images=page_items(PAGES[:1])[0].images),
            "item 1 has both text and an image",
        ),
        (InputItem(images=page_items(PAGES[:1])[0].images * 2), "item 1 has 2 images"),
        (InputItem(token_ids=(5, 6)), "item 1: model tiny-colpali does not accept token ids"),
        (InputItem(), "item 1 has no text or image"),
    ],
)
def test_an_item_that_is_not_one_text_or_one_image_is_refused(
    adapters: dict[str, ModelAdapter], item: InputItem, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        colpali(adapters["colpali"]).prepare_encode([InputItem(text="fine"), item], DOCUMENT)


# ---- scoring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, {"score_mode": "colbert"}])
def test_score_is_score_retrieval(
    family: str,
    options: dict[str, Any],
    adapters: dict[str, ModelAdapter],
    references: dict[str, tuple[Any, Any]],
) -> None:
    import torch

    model = colpali(adapters[family])
    query = QUERIES[1]
    call = resolve_score(
        model.spec,
        InputItem(text=query),
        page_items(PAGES),
        ScoreParams(options=options),
        accepted_options=model.score_option_keys(),
        limits=len(PAGES),
    )
    job = model.score_job(call)
    assert len(job.groups) == 2, "the query and the pages run as separate modalities"
    with torch.inference_mode():
        scores: list[float] = run_inline(job)
    reference = references[family]
    (q,) = reference_multivectors(reference, texts=[query])
    want = reference_scores(reference, q, reference_multivectors(reference, images=PAGES))
    assert np.ptp(want) > 0.1, "the pages must score apart for the ranking to mean something"
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    assert np.argsort(scores).tolist() == np.argsort(want).tolist()


# ---- dtype -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_weights_give_float32_rows_close_to_float32(
    family: str, folders: dict[str, Path], adapters: dict[str, ModelAdapter]
) -> None:
    import torch

    half = load_adapter(colpali_spec(folders[family]), dtype="bfloat16")
    assert colpali(half).model.dtype == torch.bfloat16
    items = page_items(PAGES[:2])
    for got, want in zip(encode(half, items), encode(adapters[family], items), strict=True):
        assert got.multivector is not None
        assert want.multivector is not None
        assert got.multivector.dtype == np.float32
        assert got.multivector.shape == want.multivector.shape
        cosines = (got.multivector * want.multivector).sum(axis=1)
        assert cosines.min() > 0.95


# ---- loading -----------------------------------------------------------------------------------


class BrokenImages:
    """A processor whose image processing fails, as one over a mismatched torchvision does."""

    def process_images(self, images: Any) -> Any:
        raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("failure", ["load", "process"])
def test_processor_falls_back_to_pil_when_the_default_backend_fails(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A torchvision that is installed but broken must not stop the model: the PIL one loads."""
    from sie_server.adapters.colpali import probe
    from sie_server.adapters.hf import load_processor
    from transformers import AutoProcessor

    original: Any = AutoProcessor.from_pretrained
    backends: list[Any] = []

    def from_pretrained(source: Any, **kwargs: Any) -> Any:
        backends.append(kwargs.get("backend"))
        if kwargs.get("backend") == "pil":
            return original(source, **kwargs)
        if failure == "load":
            raise RuntimeError("operator torchvision::nms does not exist")
        return BrokenImages()

    monkeypatch.setattr(AutoProcessor, "from_pretrained", from_pretrained)
    processor = load_processor(str(folders["colpali"]), "tiny", probe)
    assert backends == [None, "pil"]
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"


def test_a_processor_that_fails_with_both_backends_fails_the_load(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sie_server.adapters.colpali import probe
    from sie_server.adapters.hf import load_processor
    from transformers import AutoProcessor

    def broken(source: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"broken {kwargs.get('backend')}")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", broken)
    with pytest.raises(ModelLoadFailed, match="broken None; with the PIL backend: broken pil"):
        load_processor(str(folders["colpali"]), "tiny", probe)


def test_a_catalog_dim_other_than_the_models_fails_the_load(folders: dict[str, Path]) -> None:
    with pytest.raises(CatalogError, match="embedding_dim is 16, the catalog says"):
        load_adapter(colpali_spec(folders["colpali"], dims=128))


def test_a_folder_that_is_not_colpali_fails_the_load(tmp_path: Path) -> None:
    folder = build_backbone(tmp_path / "bert")
    with pytest.raises(ModelLoadFailed, match="is not a ColPali-family retrieval model"):
        load_adapter(colpali_spec(folder))


def test_a_text_only_catalog_entry_is_refused(folders: dict[str, Path]) -> None:
    with pytest.raises(CatalogError, match=r"needs inputs: \[text, image\]"):
        create_adapter(colpali_spec(folders["colpali"], inputs=("text",))).check_spec()


def test_memory_bytes_and_unload(folders: dict[str, Path]) -> None:
    adapter = load_adapter(colpali_spec(folders["colpali"], "tiny-colpali-2"))
    assert adapter.memory_bytes() > 0
    adapter.unload()
    assert adapter.memory_bytes() == 0


def test_stack_padded_pads_the_first_dim_with_zeros() -> None:
    import torch

    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    stacked = stack_padded([a, b])
    assert stacked.shape == (2, 4, 3)
    assert stacked[0, 2:].abs().sum() == 0
    assert torch.equal(stacked[0, :2], a)
    assert torch.equal(stacked[1], b)


def test_payload_reports_cost_and_modality() -> None:
    import torch

    page = ColPaliPayload(tokens={"input_ids": torch.zeros(7)}, pixels={"pixel_values": 0})
    assert (page.cost, page.is_image) == (7, True)
    assert not ColPaliPayload(tokens={"input_ids": torch.zeros(3)}, pixels={}).is_image


@pytest.mark.parametrize(
    ("name", "hf_id"),
    [
        ("vidore/colpali-v1.3-hf", "vidore/colpali-v1.3-hf"),
        ("vidore/colqwen2-v1.0-hf", "vidore/colqwen2-v1.0-hf"),
    ],
)
def test_catalog_entries_are_valid(name: str, hf_id: str) -> None:
    spec = load_catalog([BUILTIN_CATALOG_DIR])[name]
    assert spec.adapter == "colpali"
    assert spec.hf_id == hf_id
    assert spec.inputs == ("text", "image")
    assert spec.outputs["multivector"].dims == 128
    assert spec.outputs["multivector"].similarity == "maxsim"
    assert spec.profile(None).output_types == ("multivector",)
    assert set(spec.tasks) == {"encode", "score"}
    create_adapter(spec).check_spec()
