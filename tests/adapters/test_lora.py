"""LoRA adapters in-process: the dense family with peft adapters equals peft's ``PeftModel``
computed the same way, the base model stays exact (nothing merged, nothing left behind), a
broken adapter leaves the model as it was, and the catalog's ``lora`` section and policy."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sie_server.adapters.dense import DenseEncoderAdapter
from sie_server.adapters.lora import check_allowed, fetch_adapter, lora_id_of
from sie_server.catalog import CatalogError
from sie_server.catalog.spec import LoraSpec, parse_spec
from sie_server.config import Settings, load_settings
from sie_server.errors import InvalidInput, LoraLoading
from sie_server.grpc_api.server import build_registry
from sie_server.tasks.encode import EncodeSettings

from tests.harness import load_adapter, make_spec, put_in_hub_cache, run_encode
from tests.server_utils import fake_entry, write_catalog_entry
from tests.tiny_models import dense
from tests.tiny_models.lora import build_lora, cosines, mean_pooled, reference_lora

TEXTS = ["Hello, world!", "LoRA adapters change the attention projections.", "x"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dense.build_tiny_dense(tmp_path_factory.mktemp("lora") / "dense")


@pytest.fixture(scope="module")
def loras(base: Path) -> dict[str, Path]:
    return {
        name: build_lora(base.parent / name, base, seed=seed)
        for name, seed in (("a", 11), ("b", 12))
    }


@pytest.fixture
def adapter(base: Path) -> DenseEncoderAdapter:
    loaded = load_adapter(make_spec("tiny/dense", "dense", base, {"dense": dense.HIDDEN}))
    assert isinstance(loaded, DenseEncoderAdapter)
    return loaded


def load_lora(adapter: DenseEncoderAdapter, lora_id: str) -> None:
    """Both steps of a load on this thread (the server fetches beside the model thread)."""
    adapter.attach_lora(lora_id, adapter.fetch_lora(lora_id))


def encode(adapter: DenseEncoderAdapter, lora: Path | None) -> np.ndarray:
    options = {} if lora is None else {"lora_id": str(lora)}
    outputs = run_encode(adapter, TEXTS, EncodeSettings(("dense",), options=options))
    rows = [out.dense for out in outputs]
    assert all(row is not None for row in rows)
    return np.stack(rows)  # type: ignore[arg-type]


def base_weights(adapter: DenseEncoderAdapter) -> dict[str, Any]:
    """The transformer's own parameters (LoRA's injected ones left out), copied."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in adapter.model.state_dict().items()
        if "lora_" not in k
    }


def test_each_adapter_equals_peft_and_the_base_model_stays_exact(
    adapter: DenseEncoderAdapter, base: Path, loras: dict[str, Path]
) -> None:
    import torch

    plain = dense.reference_st(base, TEXTS)
    assert np.allclose(mean_pooled_plain(base), plain, atol=1e-5)  # the reference pools like ST
    before = base_weights(adapter)
    for lora in loras.values():
        load_lora(adapter, str(lora))
    for name in ("a", "b", "a"):  # switching back and forth
        got = encode(adapter, loras[name])
        assert cosines(got, reference_lora(base, loras[name], TEXTS)).min() >= 0.9999
        assert cosines(got, plain).min() < 0.999  # the adapter does change the vectors
    assert np.allclose(encode(adapter, None), plain, atol=1e-5)
    after = base_weights(adapter)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing merged
    for lora in loras.values():
        adapter.unload_lora(str(lora))
    assert not any("lora" in name for name, _ in adapter.model.named_modules())
    assert np.allclose(encode(adapter, None), plain, atol=1e-5)
    load_lora(adapter, str(loras["b"]))  # loads again after the last one left
    assert (
        cosines(encode(adapter, loras["b"]), reference_lora(base, loras["b"], TEXTS)).min()
        >= 0.9999
    )


def mean_pooled_plain(base: Path) -> np.ndarray:
    from transformers import AutoModel

    return mean_pooled(AutoModel.from_pretrained(base).eval(), base, TEXTS)


def test_an_adapter_not_loaded_is_retryable_in_the_run_hook(
    adapter: DenseEncoderAdapter, loras: dict[str, Path]
) -> None:
    with pytest.raises(LoraLoading, match="is not loaded"):
        encode(adapter, loras["a"])
    load_lora(adapter, str(loras["b"]))
    adapter.unload_lora(str(loras["b"]))
    with pytest.raises(LoraLoading, match="is not loaded"):
        encode(adapter, loras["b"])


def test_a_broken_adapter_fails_its_load_and_leaves_the_model_as_it_was(
    adapter: DenseEncoderAdapter, base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(loras["a"], broken)
    weights = load_file(broken / "adapter_model.safetensors")
    del weights[next(iter(weights))]
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="has no weights for 1 of the LoRA tensors"):
        load_lora(adapter, str(broken))
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        load_lora(adapter, str(tmp_path / "missing"))
    assert not any("lora" in name for name, _ in adapter.model.named_modules())
    assert np.allclose(encode(adapter, None), dense.reference_st(base, TEXTS), atol=1e-5)
    load_lora(adapter, str(loras["a"]))
    with pytest.raises(ValueError, match="has no weights"):
        load_lora(adapter, str(broken))  # beside a loaded one: only the broken one goes
    got = encode(adapter, loras["a"])
    assert cosines(got, reference_lora(base, loras["a"], TEXTS)).min() >= 0.9999


def test_a_hub_id_is_fetched_through_the_hf_cache_offline(
    adapter: DenseEncoderAdapter,
    base: Path,
    loras: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "org/tenant-a", loras["a"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fetched = fetch_adapter("org/tenant-a")
    assert Path(fetched.folder).is_relative_to(cache / "models--org--tenant-a" / "snapshots")
    assert fetched.config.inference_mode is True
    adapter.attach_lora("org/tenant-a", fetched)
    got = np.stack(
        [
            out.dense  # type: ignore[misc]
            for out in run_encode(
                adapter, TEXTS, EncodeSettings(("dense",), options={"lora_id": "org/tenant-a"})
            )
        ]
    )
    assert cosines(got, reference_lora(base, loras["a"], TEXTS)).min() >= 0.9999
    # Not in the cache, offline: the hub's own error, before the model is touched.
    with pytest.raises(FileNotFoundError, match="cached snapshot folder"):
        fetch_adapter("org/absent")
    with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
        fetch_adapter(str(base))  # a model's folder, not an adapter's


def spec_with(lora: Any = None, profiles: Any = None) -> Any:
    raw: dict[str, Any] = {
        "name": "m",
        "adapter": "dense",
        "hf_id": "org/m",
        "max_sequence_length": 16,
        "outputs": {"dense": {"dims": 4}},
    }
    if lora is not None:
        raw["lora"] = lora
    if profiles is not None:
        raw["profiles"] = profiles
    return parse_spec(raw)


def test_catalog_lora_section() -> None:
    assert spec_with().lora is None
    assert spec_with({"allowed": ["org/a", "org/a", "/x"]}).lora == LoraSpec(("org/a", "/x"))
    assert spec_with({"allow_any": True}).lora == LoraSpec((), allow_any=True)
    for bad, fragment in (
        ([1], "'lora' must be a mapping"),
        ({"allowed": "org/a"}, "lora.allowed must be a list"),
        ({"allowed": [""]}, "lora.allowed must be a list"),
        ({"allow_any": "yes"}, "lora.allow_any must be true or false"),
        ({"alowed": []}, "unknown key 'alowed'"),
    ):
        with pytest.raises(CatalogError, match=fragment):
            spec_with(bad)


def test_only_listed_profile_or_any_when_allowed() -> None:
    profiles = {"default": {}, "tenant": {"options": {"lora_id": "org/tenant"}}}
    listed = spec_with({"allowed": ["org/a"]}, profiles)
    check_allowed(listed, "org/a")
    check_allowed(listed, "org/tenant")  # a profile's adapter is the catalog's choice too
    with pytest.raises(InvalidInput, match=r"'/etc' is not allowed .*org/a, org/tenant"):
        check_allowed(listed, "/etc")
    with pytest.raises(InvalidInput, match="allowed: none"):
        check_allowed(spec_with(), "org/a")  # no section: no adapter
    check_allowed(spec_with({"allow_any": True}), "/any/folder")


@pytest.mark.parametrize("value", [3, "", ["org/a"]])
def test_lora_id_must_be_a_non_empty_string(value: Any) -> None:
    with pytest.raises(InvalidInput, match="option 'lora_id' must be a non-empty string"):
        lora_id_of({"lora_id": value}, "m")
    assert lora_id_of({}, "m") is None


def test_max_loras_per_model_flag() -> None:
    assert load_settings([], {}).max_loras_per_model == 4
    assert load_settings(["--max-loras-per-model", "2"], {}).max_loras_per_model == 2
    with pytest.raises(SystemExit, match="at least 1"):
        load_settings([], {"SIE_MAX_LORAS_PER_MODEL": "0"})


def test_a_lora_section_on_a_family_without_lora_stops_the_server(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path, fake_entry("fake/lora", lora={"allowed": ["org/a"]}))
    with pytest.raises(
        CatalogError, match=r"lora: adapter family 'tests\.fakes:FakeAdapter' cannot"
    ):
        build_registry(Settings(models_dir=(tmp_path,), device="cpu"))
