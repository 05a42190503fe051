"""Loading by hub id: a catalog entry with only `hf_id` resolves through the HF cache, with
HF_HUB_OFFLINE=1 and no network, exactly as a user's cached download would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.harness import put_in_hub_cache
from tests.tiny_models import bge_m3, dense

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import numpy as np
from sie_server.tasks.encode import EncodeSettings
from tests.harness import load_adapter, make_spec, prepare, run_encode
from sie_server.catalog.spec import parse_spec

raw = json.loads(sys.argv[1])
spec = parse_spec(raw)
adapter = load_adapter(spec)
out = run_encode(adapter, ["Hello, world!"], EncodeSettings(output_types=tuple(raw["outputs"])))
print(json.dumps({"source": spec.weights_source(), "dense": out[0].dense.tolist()}))
"""


def load_offline(cache: Path, entry: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """Load ``entry`` in a fresh process whose HF cache is ``cache``, offline."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(entry)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def run_offline(cache: Path, entry: dict[str, object]) -> dict[str, object]:
    result = load_offline(cache, entry)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def dense_reference(files: Path) -> np.ndarray:
    # Pooling and normalization come from the cached sentence-transformers files.
    return dense.reference_dense(files, ["Hello, world!"])[0]


def bge_m3_reference(files: Path) -> np.ndarray:
    return np.asarray(bge_m3.reference_bge_m3(files, ["Hello, world!"], 128)[0]["dense"])


@pytest.mark.parametrize(
    ("adapter", "build", "dims", "reference"),
    [
        ("dense", dense.build_tiny_dense, dense.HIDDEN, dense_reference),
        ("bge_m3", bge_m3.build_tiny_bge_m3, bge_m3.HIDDEN, bge_m3_reference),
    ],
)
def test_model_loads_by_hub_id_from_the_offline_cache(
    tmp_path: Path,
    adapter: str,
    build: Callable[[Path], Path],
    dims: int,
    reference: Callable[[Path], np.ndarray],
) -> None:
    files = build(tmp_path / "build")
    repo_id = f"tiny-org/tiny-{adapter}"
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, repo_id, files)
    entry = {
        "name": repo_id,
        "adapter": adapter,
        "hf_id": repo_id,
        "max_sequence_length": 128,
        "outputs": {"dense": {"dims": dims}},
    }
    got = run_offline(cache, entry)
    assert got["source"] == repo_id
    np.testing.assert_allclose(np.asarray(got["dense"]), reference(files), atol=1e-5)


def test_missing_model_offline_fails_clearly(tmp_path: Path) -> None:
    entry = {
        "name": "nobody/nothing",
        "adapter": "dense",
        "hf_id": "nobody/nothing",
        "max_sequence_length": 8,
        "outputs": {"dense": {"dims": 4}},
    }
    result = load_offline(tmp_path, entry)
    assert result.returncode != 0
    assert "offline mode" in result.stderr  # not a network timeout: a clear offline miss
