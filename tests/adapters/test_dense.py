"""The dense adapter runs the sentence-transformers pipeline a model ships (Pooling modes,
include_prompt, Dense, LayerNorm, Normalize, prompts), checked against
``SentenceTransformer(folder).encode`` on the same saved tiny models."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.dense import DenseEncoderAdapter
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import CatalogError
from sie_server.domain import InputItem
from sie_server.engine.warmup import run_inline
from sie_server.errors import ModelLoadFailed
from sie_server.tasks.encode import EncodeParams, EncodeSettings, resolve_encode

from tests.harness import load_adapter, make_spec, prepare, run_encode
from tests.tiny_models.dense import (
    HIDDEN,
    DenseLayer,
    build_backbone,
    build_st_model,
    reference_st,
    st_model,
)

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Every mode, in an order unlike sentence-transformers' legacy one.
ALL_MODES = ("lasttoken", "mean", "cls", "weightedmean", "max", "mean_sqrt_len_tokens")
PROMPTS = {"query": "query: ", "document": "passage: "}
TEXTS = [
    "Short one.",
    "A much longer text about vector search, latency and tokenization, with numbers 3.14 "
    "and punctuation; several times longer than the first one in tokens.",
    "x",
    "Who wrote the first program?",
]
DOCUMENT = EncodeSettings(("dense",))
QUERY = EncodeSettings(("dense",), is_query=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dense")


@pytest.fixture(scope="module")
def backbone(root: Path) -> Path:
    return build_backbone(root / "backbone")


@pytest.fixture(scope="module")
def prompted(root: Path, backbone: Path) -> Path:
    """Every pooling mode without the prompt tokens, query/document prompts, no Normalize."""
    return build_st_model(
        root / "prompted",
        backbone,
        pooling=ALL_MODES,
        include_prompt=False,
        normalize=False,
        prompts=PROMPTS,
    )


def load(folder: Path, dims: int, **spec: Any) -> DenseEncoderAdapter:
    adapter = load_adapter(make_spec("tiny/dense", "dense", folder, {"dense": dims}, **spec))
    assert isinstance(adapter, DenseEncoderAdapter)
    return adapter


def encode(adapter: ModelAdapter, texts: Sequence[str], settings: EncodeSettings) -> np.ndarray:
    return np.stack([out.dense for out in run_encode(adapter, texts, settings)])


def assert_matches(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


# ---- pooling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_each_pooling_mode_matches_sentence_transformers(
    root: Path, backbone: Path, mode: str
) -> None:
    # Without Normalize, so that a mode that differs only in scale (mean vs mean_sqrt) shows.
    folder = build_st_model(root / f"pool-{mode}", backbone, pooling=mode, normalize=False)
    adapter = load(folder, HIDDEN)
    assert adapter.pipeline.pooling.modes == (mode,)
    assert_matches(encode(adapter, TEXTS, DOCUMENT), reference_st(folder, TEXTS))


def test_several_modes_concatenate_in_the_configured_order(root: Path, backbone: Path) -> None:
    folder = build_st_model(root / "multi", backbone, pooling=ALL_MODES, normalize=False)
    adapter = load(folder, HIDDEN * len(ALL_MODES))
    assert adapter.pipeline.pooling.modes == ALL_MODES
    got = encode(adapter, TEXTS, DOCUMENT)
    assert_matches(got, reference_st(folder, TEXTS))
    # Each slice is its mode: the mean block (2nd) differs from the mean_sqrt block (6th).
    assert not np.allclose(got[:, HIDDEN : 2 * HIDDEN], got[:, 5 * HIDDEN :])


def test_legacy_files_read_in_legacy_order(root: Path, backbone: Path) -> None:
    # Older saves (all-MiniLM-L6-v2's): `sentence_transformers.models.*` types, boolean
    # pooling_mode_* flags, whose modes concatenate in sentence-transformers' fixed order (max
    # before mean), and no 2_Normalize folder at all.
    folder = build_st_model(root / "legacy", backbone, pooling="mean")
    shutil.rmtree(folder / "2_Normalize")
    edit_json(
        folder / "modules.json",
        lambda modules: [
            {**m, "type": "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]}
            for m in modules
        ],
    )
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": HIDDEN,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": True,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    adapter = load(folder, 2 * HIDDEN)
    assert adapter.pipeline.pooling.modes == ("max", "mean")
    got = encode(adapter, TEXTS, DOCUMENT)
    assert_matches(got, reference_st(folder, TEXTS))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_a_plain_transformers_folder_pools_like_sentence_transformers(backbone: Path) -> None:
    # No modules.json: sentence-transformers wraps the checkpoint in mean pooling, no Normalize.
    adapter = load(backbone, HIDDEN)
    assert adapter.pipeline.pooling.modes == ("mean",)
    assert adapter.pipeline.heads == ()
    assert_matches(encode(adapter, TEXTS, DOCUMENT), reference_st(backbone, TEXTS))


def test_load_options_override_pooling_and_normalize(root: Path, backbone: Path) -> None:
    mean_normalized = build_st_model(root / "plain", backbone)
    cls_max = build_st_model(root / "cls-max", backbone, pooling=("cls", "max"), normalize=False)
    adapter = load(
        mean_normalized, 2 * HIDDEN, load_options={"pooling": ["cls", "max"], "normalize": False}
    )
    assert_matches(encode(adapter, TEXTS, DOCUMENT), reference_st(cls_max, TEXTS))
    # normalize: true adds the Normalize a model without one lacks.
    renormalized = load(cls_max, 2 * HIDDEN, load_options={"normalize": True})
    want = reference_st(cls_max, TEXTS, normalize_embeddings=True)
    assert_matches(encode(renormalized, TEXTS, DOCUMENT), want)


# ---- Dense, LayerNorm, Normalize -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "layer_norm"),
    [
        ((DenseLayer(16, "Tanh"),), False),
        ((DenseLayer(24, "Identity"), DenseLayer(8, "Tanh", bias=False)), False),
        (
            (DenseLayer(24, "GELU", use_residual=True), DenseLayer(24, "ReLU", use_residual=True)),
            True,
        ),
    ],
    ids=["tanh", "identity-then-tanh-no-bias", "residual-gelu-relu-layernorm"],
)
def test_dense_layers_match_sentence_transformers(
    root: Path, backbone: Path, layers: tuple[DenseLayer, ...], layer_norm: bool
) -> None:
    name = "-".join(f"{layer.activation}{layer.out_features}" for layer in layers)
    folder = build_st_model(
        root / f"dense-{name}-{layer_norm}", backbone, dense=layers, layer_norm=layer_norm
    )
    assert len(list((folder).glob("*_Dense"))) == len(layers)
    adapter = load(folder, layers[-1].out_features)
    got = encode(adapter, TEXTS, DOCUMENT)
    assert_matches(got, reference_st(folder, TEXTS))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_dense_weights_from_pytorch_model_bin(root: Path, backbone: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = build_st_model(root / "dense-bin", backbone, dense=[DenseLayer(16, "Tanh")])
    weights = folder / "2_Dense" / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "2_Dense" / "pytorch_model.bin")
    weights.unlink()
    adapter = load(folder, 16)
    assert_matches(encode(adapter, TEXTS, DOCUMENT), reference_st(folder, TEXTS))


# ---- prompts -------------------------------------------------------------------------------------
def test_include_prompt_false_leaves_the_prompt_out_of_pooling(prompted: Path) -> None:
    adapter = load(prompted, HIDDEN * len(ALL_MODES))
    st = st_model(prompted)
    for settings, name in ((QUERY, "query"), (DOCUMENT, "document")):
        payloads = prepare(adapter, TEXTS, settings)
        want_count = st.preprocess(["x"], prompt=PROMPTS[name])["prompt_length"]
        assert [p.extra for p in payloads] == [want_count] * len(TEXTS)
        got = encode(adapter, TEXTS, settings)
        assert_matches(got, reference_st(prompted, TEXTS, prompt_name=name))
    # Not the same as pooling over the prompt too.
    with_prompt = reference_st(prompted, ["query: " + t for t in TEXTS], prompt="")
    assert not np.allclose(encode(adapter, TEXTS, QUERY), with_prompt, atol=1e-3)


def test_items_with_and_without_a_prompt_share_a_batch(prompted: Path) -> None:
    # An instruction replaces the model's prompt but does not split batches: the prompt's
    # token count is per item.
    adapter = load(prompted, HIDDEN * len(ALL_MODES))
    instructed = EncodeSettings(("dense",), is_query=True, instruction="Find the answer:")
    assert instructed.batch_key() == QUERY.batch_key()
    payloads = prepare(adapter, TEXTS[:2], QUERY) + prepare(adapter, TEXTS[2:], instructed)
    import torch

    with torch.inference_mode():
        outputs = adapter.run_encode(adapter.collate_encode(payloads, QUERY), QUERY)
    got = np.stack([out.dense for out in outputs])
    want = np.concatenate(
        [
            reference_st(prompted, TEXTS[:2], prompt_name="query"),
            reference_st(prompted, [f"Find the answer: {t}" for t in TEXTS[2:]], prompt=""),
        ]
    )
    assert_matches(got, want)


@pytest.mark.parametrize(
    ("prompts", "default", "query_prompt", "document_prompt"),
    [
        ({"query": "q: ", "classify": "c: "}, "classify", "query", None),
        ({"query": "query: ", "passage": "passage: "}, None, "query", "passage"),
        ({"classify": "c: "}, "classify", None, None),
    ],
    ids=["query-and-default", "query-and-passage", "default-only"],
)
def test_model_prompts_by_side(
    root: Path,
    backbone: Path,
    prompts: Mapping[str, str],
    default: str | None,
    query_prompt: str | None,
    document_prompt: str | None,
) -> None:
    # A None prompt name: sentence-transformers' encode falls back to default_prompt_name.
    folder = build_st_model(
        root / f"prompts-{'-'.join(prompts)}-{default}",
        backbone,
        prompts=prompts,
        default_prompt_name=default,
    )
    adapter = load(folder, HIDDEN)
    query = reference_st(folder, TEXTS, prompt_name=query_prompt)
    document = reference_st(folder, TEXTS, prompt_name=document_prompt)
    assert_matches(encode(adapter, TEXTS, QUERY), query)
    assert_matches(encode(adapter, TEXTS, DOCUMENT), document)
    assert not np.allclose(query, reference_st(folder, TEXTS, prompt=""), atol=1e-3)


def test_catalog_template_wins_over_the_model_prompt(prompted: Path) -> None:
    # Driven as the engine does: resolve_encode, encode_job, run_inline.
    import torch

    spec = make_spec(
        "tiny/dense",
        "dense",
        prompted,
        {"dense": HIDDEN * len(ALL_MODES)},
        profiles={
            "default": {
                "output_types": ["dense"],
                "options": {"query_template": "search: {text}"},
            }
        },
    )
    adapter = load_adapter(spec)
    assert isinstance(adapter, DenseEncoderAdapter)
    items = [InputItem(text=t) for t in TEXTS]

    def job(**params: Any) -> np.ndarray:
        call = resolve_encode(
            spec,
            items,
            EncodeParams(**params),
            accepted_options=adapter.encode_options,
            limits=len(items),
        )
        with torch.inference_mode():  # as on the model thread
            results = run_inline(adapter.encode_job(call))
        tokens = [p.cost for p in adapter.prepare_encode(items, call.settings)]
        assert [r.num_tokens for r in results] == tokens
        return np.stack([r.dense for r in results])

    # The query side has a catalog template: no model prompt (all tokens pooled).
    searched = reference_st(prompted, [f"search: {t}" for t in TEXTS], prompt="")
    assert_matches(job(is_query=True), searched)
    # An instruction replaces the model prompt too.
    instructed = reference_st(prompted, [f"Be brief {t}" for t in TEXTS], prompt="")
    assert_matches(job(is_query=True, instruction="Be brief"), instructed)
    # The document side has no template: the model's document prompt applies.
    assert_matches(job(is_query=False), reference_st(prompted, TEXTS, prompt_name="document"))


# ---- tokenizer -----------------------------------------------------------------------------------
def test_do_lower_case_lowercases_like_sentence_transformers(root: Path) -> None:
    # sentence-transformers 6 no longer saves do_lower_case, but reads it from older saves.
    cased = build_backbone(root / "cased-backbone", cased=True)
    folder = build_st_model(root / "lower", cased)
    edit_json(folder / "sentence_bert_config.json", lambda c: {**c, "do_lower_case": True})
    adapter = load(folder, HIDDEN)
    texts = ["HELLO World", "Vector SEARCH in Paris"]
    (upper,) = prepare(adapter, ["HELLO World"], DOCUMENT)
    (lower,) = prepare(adapter, ["hello world"], DOCUMENT)
    assert upper.input_ids == lower.input_ids
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(cased))
    assert raw("HELLO World")["input_ids"] != upper.input_ids  # the backbone alone keeps case
    assert_matches(encode(adapter, texts, DOCUMENT), reference_st(folder, texts))


# ---- errors --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_dense(root: Path, backbone: Path) -> Path:
    return build_st_model(root / "with-dense", backbone, dense=[DenseLayer(16, "Tanh")])


@pytest.mark.parametrize(
    ("module_type", "path"),
    [
        ("sentence_transformers.sentence_transformer.modules.lstm.LSTM", "2_LSTM"),
        ("sentence_transformers.models.CNN", "2_CNN"),
        ("my_package.modules.Pooling", "2_Custom"),
        ("sentence_transformers.base.modules.router.Router", ""),
    ],
)
def test_a_module_the_adapter_cannot_run_fails_the_load(
    root: Path, with_dense: Path, module_type: str, path: str
) -> None:
    folder = copy_model(with_dense, root / f"unknown-{path or 'root'}-{module_type[-4:]}")
    edit_json(
        folder / "modules.json",
        lambda modules: [
            *modules[:2],
            {"idx": 2, "name": "2", "path": path, "type": module_type},
            *modules[2:],
        ],
    )
    with pytest.raises(ModelLoadFailed) as caught:
        load(folder, 16)
    assert module_type in caught.value.message
    assert f"in folder {path!r}" in caught.value.message
    assert caught.value.model == "tiny/dense"


def test_a_transformer_outside_the_root_fails_the_load(root: Path, with_dense: Path) -> None:
    folder = copy_model(with_dense, root / "sub-transformer")
    edit_json(folder / "modules.json", lambda m: [{**m[0], "path": "0_Transformer"}, *m[1:]])
    with pytest.raises(ModelLoadFailed, match=r"Transformer.*in folder '0_Transformer'"):
        load(folder, 16)


@pytest.mark.parametrize(
    "activation",
    [
        "torch.nn.modules.activation.NoSuchActivation",
        "my_package.activations.Swish",
        "torch.nn.modules.linear.Linear",
        "torch.nn.functional.gelu",
    ],
)
def test_an_unknown_activation_is_refused(root: Path, with_dense: Path, activation: str) -> None:
    folder = copy_model(with_dense, root / f"activation-{activation.rsplit('.', 1)[-1]}")
    edit_json(
        folder / "2_Dense" / "config.json", lambda c: {**c, "activation_function": activation}
    )
    with pytest.raises(ModelLoadFailed) as caught:
        load(folder, 16)
    assert activation in caught.value.message
    assert "Dense in '2_Dense'" in caught.value.message


def test_catalog_dims_must_match_the_pipeline(with_dense: Path) -> None:
    with pytest.raises(CatalogError, match=r"outputs.dense.dims is 32.*pipeline gives 16"):
        load(with_dense, HIDDEN)


def test_dense_weights_that_do_not_fit_fail_the_load(root: Path, with_dense: Path) -> None:
    folder = copy_model(with_dense, root / "dense-misfit")
    edit_json(folder / "2_Dense" / "config.json", lambda c: {**c, "bias": False})
    with pytest.raises(ModelLoadFailed, match="weights of Dense in '2_Dense' do not fit"):
        load(folder, 16)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pooling": "median"}, "load_options.pooling must be one of"),
        ({"pooling": ["mean", 3]}, "load_options.pooling must be one of"),
        ({"normalize": "yes"}, "load_options.normalize must be true or false"),
    ],
)
def test_bad_load_options_are_catalog_errors(
    with_dense: Path, options: dict[str, Any], message: str
) -> None:
    adapter = create_adapter(
        make_spec("tiny/dense", "dense", with_dense, {"dense": 16}, load_options=options)
    )
    with pytest.raises(CatalogError, match=message):
        adapter.check_spec()
