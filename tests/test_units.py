"""Units: settings, catalog parsing, output dtypes, tensors, import direction."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sie_sdk.tensors import TensorError, from_tensor, to_tensor
from sie_sdk.v1 import common_pb2
from sie_server.catalog import BUILTIN_CATALOG_DIR, CatalogError, load_catalog
from sie_server.catalog.spec import parse_spec
from sie_server.config import Settings, load_settings
from sie_server.tasks.output_dtype import convert, sparse_dtype

ROOT = Path(__file__).resolve().parents[1]


# ---- settings ----------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = load_settings([], environ={})
    assert settings == Settings()
    assert settings.port == 50051
    assert settings.device == "auto"
    assert settings.catalog_dirs == (BUILTIN_CATALOG_DIR,)


def test_flags_override_env_and_env_overrides_defaults(tmp_path: Path) -> None:
    env = {
        "SIE_PORT": "6000",
        "SIE_DEVICE": "cpu",
        "SIE_PRELOAD": "a,b",
        "SIE_MODELS_DIR": str(tmp_path),
    }
    from_env = load_settings([], environ=env)
    assert from_env.port == 6000
    assert from_env.device == "cpu"
    assert from_env.preload == ("a", "b")
    assert from_env.catalog_dirs == (tmp_path,)
    flags = load_settings(
        ["--port", "7000", "--preload", "c", "--max-batch-tokens", "99"], environ=env
    )
    assert flags.port == 7000
    assert flags.preload == ("c",)
    assert flags.max_batch_tokens == 99
    assert flags.device == "cpu"


def test_batch_token_budget_defaults_by_device_and_a_flag_overrides_it() -> None:
    from sie_server.device import (
        CPU_BATCH_TOKENS,
        GPU_BATCH_TOKENS,
        Placement,
        default_batch_tokens,
    )
    from sie_server.grpc_api.server import build_registry

    assert default_batch_tokens(Placement("cpu", "float32")) == CPU_BATCH_TOKENS
    assert default_batch_tokens(Placement("cuda:0", "bfloat16", "h100")) == GPU_BATCH_TOKENS
    assert CPU_BATCH_TOKENS < GPU_BATCH_TOKENS
    auto = build_registry(
        Settings(device="cpu", models=("sentence-transformers/all-MiniLM-L6-v2",))
    )
    assert auto.config.executor.max_batch_tokens == CPU_BATCH_TOKENS
    flag = load_settings(["--device", "cpu", "--max-batch-tokens", "5000"], environ={})
    assert build_registry(flag).config.executor.max_batch_tokens == 5000
    with pytest.raises(SystemExit, match="--max-batch-tokens must be 0"):
        load_settings(["--max-batch-tokens", "-1"], environ={})


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_a_cpu_that_emulates_it_is_warned_of(
    dtype: str, native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sie_server import device

    monkeypatch.setattr(device, "cpu_computes_natively", lambda name: native or name == "float32")
    with caplog.at_level(logging.WARNING, logger="sie_server.device"):
        assert device.resolve_placement("cpu", dtype) == device.Placement("cpu", dtype)
        assert device.resolve_placement("cpu", "auto") == device.Placement("cpu", "float32")
    warned = [r.getMessage() for r in caplog.records]
    assert warned == (
        []
        if native
        else [
            f"--dtype {dtype} on a CPU without native {dtype} "
            "matrix multiplies: torch emulates them, about 5x slower "
            "than float32 (docs/performance.md); use float32 here"
        ]
    )


def test_a_catalog_entrys_arrival_window_overrides_the_flag_for_its_model_only() -> None:
    from sie_server.grpc_api.server import build_registry

    waiting = parse_spec({**BASE, "batch_wait_ms": 100}, source_file=Path("m.yaml"))
    assert waiting.batch_wait_ms == 100.0
    off = parse_spec({**BASE, "name": "off", "batch_wait_ms": 0}, source_file=Path("o.yaml"))
    plain = parse_spec({**BASE, "name": "plain"}, source_file=Path("p.yaml"))
    assert plain.batch_wait_ms is None
    registry = build_registry(load_settings(["--device", "cpu", "--batch-wait-ms", "5"], {}))
    windows = [registry._executor_config(s).batch_wait_ms for s in (waiting, off, plain)]
    assert windows == [100.0, 0.0, 5.0]
    with pytest.raises(SystemExit, match=r"--batch-wait-ms must be from 0 \(off\) to 1000"):
        load_settings(["--batch-wait-ms", "-1"], environ={})
    with pytest.raises(SystemExit, match="--batch-wait-ms must be from 0"):
        load_settings(["--batch-wait-ms", "2000"], environ={})


def test_bad_env_value_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="SIE_PORT='x' is not a valid int"):
        load_settings([], environ={"SIE_PORT": "x"})


# ---- catalog -------------------------------------------------------------------------------------


def test_builtin_catalog_has_the_required_families() -> None:
    catalog = load_catalog([BUILTIN_CATALOG_DIR])
    assert {
        "sentence-transformers/all-MiniLM-L6-v2",
        "BAAI/bge-m3",
        "BAAI/bge-small-en-v1.5",
        "intfloat/e5-base-v2",
        "naver/splade-cocondenser-ensembledistil",
        "colbert-ir/colbertv2.0",
    } <= set(catalog)
    bge = catalog["BAAI/bge-m3"]
    assert set(bge.outputs) == {"dense", "sparse", "multivector"}
    assert bge.outputs["sparse"].dims == 250002
    minilm = catalog["sentence-transformers/all-MiniLM-L6-v2"]
    # The embedded default resolves to the package's folder, not the hub.
    assert Path(minilm.weights_source()).is_dir()


BASE = {
    "name": "m",
    "adapter": "dense",
    "hf_id": "org/m",
    "max_sequence_length": 8,
    "outputs": {"dense": {"dims": 4}},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "'name'"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"outputs": {"colour": {"dims": 4}}}, "unknown output type 'colour'"),
        ({"outputs": {"dense": {}}}, "outputs.dense needs a positive integer 'dims'"),
        ({"profiles": {"p": {"output_types": ["sparse"]}}}, "not among the outputs"),
        ({"default_profile": "zzz"}, "default_profile"),
        ({"hf_id": None}, "one of 'hf_id', 'weights_path' or 'weights_package'"),
        ({"max_batch_tokens": -1}, "max_batch_tokens"),
        ({"batch_wait_ms": -1}, "'batch_wait_ms' must be a number of milliseconds from 0 to"),
        ({"batch_wait_ms": 5000}, "'batch_wait_ms' must be a number"),
        ({"batch_wait_ms": "100"}, "'batch_wait_ms' must be a number"),
        ({"batch_wait_ms": True}, "'batch_wait_ms' must be a number"),
        ({"batch_wait_msec": 5}, "unknown key 'batch_wait_msec'; did you mean 'batch_wait_ms'"),
        ({"xyzzy": 1}, r"unknown key 'xyzzy' \(known: name, hf_id"),
        (
            {"outputs": {"dense": {"dims": 4}}, "profiles": {"p": {"output_type": ["dense"]}}},
            "unknown key 'profiles.p.output_type'; did you mean 'output_types'",
        ),
        ({"profiles": {"p": ["dense"]}}, "profiles.p must be a mapping"),
    ],
)
def test_bad_catalog_entries_name_the_field(change: dict[str, object], message: str) -> None:
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(CatalogError, match=message):
        parse_spec(raw, source_file=Path("x.yaml"))


def test_weights_path_is_relative_to_the_yaml(tmp_path: Path) -> None:
    spec = parse_spec({**BASE, "weights_path": "weights"}, source_file=tmp_path / "m.yaml")
    with pytest.raises(CatalogError, match="is not a folder"):
        spec.weights_source()
    (tmp_path / "weights").mkdir()
    assert spec.weights_source() == str(tmp_path / "weights")


def test_duplicate_names_and_bad_yaml_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "name: m\nadapter: dense\nhf_id: x\nmax_sequence_length: 8\noutputs: {dense: {dims: 4}}\n"
    )
    (tmp_path / "b.yaml").write_text((tmp_path / "a.yaml").read_text())
    with pytest.raises(CatalogError, match="already in"):
        load_catalog([tmp_path])
    (tmp_path / "b.yaml").write_text("name: [unclosed")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog([tmp_path])


# ---- output dtypes -------------------------------------------------------------------------------


# Every expected value below is worked out by hand from the rules in tasks/output_dtype.py:
# int8 round(x * 127 / max|x|), uint8 round((x - min) / (max - min) * 255), binary one bit per
# value (x > 0), first value in the high bit. round() is half to even, as numpy's (and SIE's).


def test_int8_is_per_row_symmetric() -> None:
    x = np.array([[0.5, -1.0, 0.25], [2.0, 1.0, -0.5], [-4.0, 1.0, 2.0]], dtype=np.float32)
    q = convert(x, "int8")
    assert q.dtype == np.int8
    # Row 1 peak 1: 63.5 -> 64, -127, 31.75 -> 32. Row 2 peak 2: 127, 63.5 -> 64, -31.75 -> -32.
    # Row 3 peak |-4|: -127, 31.75 -> 32, 63.5 -> 64.
    np.testing.assert_array_equal(q, [[64, -127, 32], [127, 64, -32], [-127, 32, 64]])


def test_int8_of_a_vector_rounds_half_to_even() -> None:
    x = np.array([127.0, 2.5, -3.5, 0.4, -127.0, 126.5], dtype=np.float32)
    q = convert(x, "int8")  # peak 127: x itself, rounded
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [127, 2, -4, 0, -127, 126])


def test_uint8_is_per_row_min_max() -> None:
    x = np.array([[0.0, 1.0, 0.5], [-2.0, 2.0, 0.0], [-1.0, 0.5, -0.5]], dtype=np.float32)
    q = convert(x, "uint8")
    assert q.dtype == np.uint8
    # Row 1: 0, 255, 127.5 -> 128. Row 2: (x + 2) / 4 * 255: 0, 255, 127.5 -> 128.
    # Row 3 (min -1, max 0.5): (x + 1) / 1.5 * 255: 0, 255, 85.
    np.testing.assert_array_equal(q, [[0, 255, 128], [0, 255, 128], [0, 255, 85]])


def test_uint8_of_a_vector() -> None:
    x = np.array([-1.0, 0.5, -0.5, 1.0, 0.0], dtype=np.float32)
    # (x + 1) / 2 * 255: 0, 191.25 -> 191, 63.75 -> 64, 255, 127.5 -> 128.
    np.testing.assert_array_equal(convert(x, "uint8"), [0, 191, 64, 255, 128])


def test_binary_packs_positive_bits_high_bit_first() -> None:
    x = np.array([0.3, -1, 0, 2, 5, -0.1, 0, 7, -2, 1], dtype=np.float32)
    q = convert(x, "binary")
    assert q.dtype == np.uint8
    # 1 0 0 1 1 0 0 1 = 128 + 16 + 8 + 1 = 153; then 0 1 and six padding zeros = 64.
    np.testing.assert_array_equal(q, [153, 64])


def test_binary_packs_each_row() -> None:
    x = np.array([[1.0] * 8 + [-1.0] * 8, [-1.0] * 7 + [0.0] + [0.0] * 7 + [0.5]], dtype=np.float32)
    q = convert(x, "binary")
    assert q.shape == (2, 2)
    np.testing.assert_array_equal(q, [[255, 0], [0, 1]])  # zero is not positive


def test_float_dtypes_are_casts() -> None:
    x = np.array([0.1, -2.0, 65504.0], dtype=np.float32)
    half = convert(x, "float16")
    assert half.dtype == np.float16
    assert half.tolist() == [0.0999755859375, -2.0, 65504.0]  # the nearest float16 values
    same = convert(x, "float32")
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, x)


def test_constant_rows_do_not_divide_by_zero() -> None:
    zeros = np.zeros((2, 4), dtype=np.float32)
    np.testing.assert_array_equal(convert(zeros, "int8"), 0)
    np.testing.assert_array_equal(convert(zeros, "uint8"), 0)
    np.testing.assert_array_equal(convert(zeros, "binary"), [[0], [0]])


def test_unknown_dtype_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown output dtype 'int4'"):
        convert(np.zeros(4, dtype=np.float32), "int4")


@pytest.mark.parametrize(
    ("requested", "sparse"),
    [
        ("float32", "float32"),
        ("float16", "float16"),
        ("int8", "float32"),
        ("uint8", "float32"),
        ("binary", "float32"),
    ],
)
def test_sparse_values_stay_float(requested: str, sparse: str) -> None:
    assert sparse_dtype(requested) == sparse


# ---- tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.arange(12, dtype=np.float32).reshape(3, 4), common_pb2.DTYPE_FLOAT32),
        (np.arange(6, dtype=np.float16), common_pb2.DTYPE_FLOAT16),
        (np.array([-127, 0, 127], dtype=np.int8), common_pb2.DTYPE_INT8),
        (np.array([1, 5, 9], dtype=np.int32), common_pb2.DTYPE_INT32),
    ],
)
def test_tensor_round_trip(array: np.ndarray, dtype: int) -> None:
    tensor = to_tensor(array, dtype)  # type: ignore[arg-type]
    assert list(tensor.shape) == list(array.shape)
    assert len(tensor.data) == array.nbytes
    np.testing.assert_array_equal(from_tensor(tensor), array)


def test_tensor_with_wrong_byte_count_is_rejected() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[3], data=b"\x00" * 8)
    with pytest.raises(TensorError, match="needs 12 bytes"):
        from_tensor(tensor)


# ---- packaging -------------------------------------------------------------------------------------


def test_sdk_imports_without_torch_or_server() -> None:
    code = (
        "import sys, sie_sdk, sie_sdk.tensors, sie_sdk.v1.encode_pb2_grpc; "
        "bad = [m for m in ('torch', 'transformers', 'sie_server', 'sie_bridge') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_direction() -> None:
    """sie_sdk imports nothing of ours; server and bridge never import each other."""
    rules = {
        "sdk/sie_sdk": ("sie_server", "sie_bridge"),
        "server/sie_server": ("sie_bridge",),
        "http_bridge/sie_bridge": ("sie_server",),
    }
    offenders = []
    for folder, banned in rules.items():
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            offenders += [
                f"{path.relative_to(ROOT)} imports {b}"
                for b in banned
                if f"import {b}" in text or f"from {b}" in text
            ]
    assert offenders == []


def test_memory_heavy_families_batch_within_half_a_gigabyte_of_logits() -> None:
    # SPLADE computes vocabulary-sized logits per token; its catalog entries carry their own budget.
    catalog = load_catalog([BUILTIN_CATALOG_DIR])
    for spec in catalog.values():
        if spec.adapter == "splade":
            vocab = spec.outputs["sparse"].dims
            assert vocab is not None
            assert spec.max_batch_tokens is not None, spec.name
            assert spec.max_batch_tokens * vocab * 4 <= 512 * 1024 * 1024, spec.name
