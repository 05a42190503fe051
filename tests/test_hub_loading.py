"""Loading by hub id: a catalog entry with only `hf_id` resolves through the HF cache, with
HF_HUB_OFFLINE=1 and no network, exactly as a user's cached download would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import bge_m3, dense

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import numpy as np
from sie_server.adapters.base import EncodeSettings
from tests.harness import load_adapter, make_spec, run_encode
from sie_server.catalog.spec import parse_spec

raw = json.loads(sys.argv[1])
spec = parse_spec(raw)
adapter = load_adapter(spec)
out = run_encode(adapter, ["Hello, world!"], EncodeSettings(output_types=tuple(raw["outputs"])))
print(json.dumps({"source": spec.weights_source(), "dense": out[0].dense.tolist()}))
"""


def put_in_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay out ``files`` as huggingface_hub stores a downloaded snapshot of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    shutil.copytree(files, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def run_offline(cache: Path, entry: dict[str, object]) -> dict[str, object]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(entry)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_dense_model_loads_by_hub_id_from_the_offline_cache(tmp_path: Path) -> None:
    files = dense.build_tiny_dense(tmp_path / "build")
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "tiny-org/tiny-dense", files)
    entry = {
        "name": "tiny-org/tiny-dense",
        "adapter": "dense",
        "hf_id": "tiny-org/tiny-dense",
        "max_sequence_length": 128,
        "outputs": {"dense": {"dims": dense.HIDDEN}},
    }
    got = run_offline(cache, entry)
    assert got["source"] == "tiny-org/tiny-dense"
    # Pooling and normalization came from the cached sentence-transformers files.
    want = dense.reference_dense(files, ["Hello, world!"])[0]
    np.testing.assert_allclose(np.asarray(got["dense"]), want, atol=1e-5)


def test_bge_m3_heads_load_from_the_offline_cache(tmp_path: Path) -> None:
    files = bge_m3.build_tiny_bge_m3(tmp_path / "build")
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "tiny-org/tiny-bge-m3", files)
    entry = {
        "name": "tiny-org/tiny-bge-m3",
        "adapter": "bge_m3",
        "hf_id": "tiny-org/tiny-bge-m3",
        "max_sequence_length": 128,
        "outputs": {"dense": {"dims": bge_m3.HIDDEN}},
    }
    got = run_offline(cache, entry)
    want = bge_m3.reference_bge_m3(files, ["Hello, world!"], 128)[0]["dense"]
    np.testing.assert_allclose(np.asarray(got["dense"]), want, atol=1e-5)


def test_missing_model_offline_fails_clearly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    entry = {
        "name": "nobody/nothing",
        "adapter": "dense",
        "hf_id": "nobody/nothing",
        "max_sequence_length": 8,
        "outputs": {"dense": {"dims": 4}},
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(entry)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "offline mode" in result.stderr  # not a network timeout: a clear offline miss
