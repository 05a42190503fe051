"""The SDK installs and imports without torch: a fresh venv with ``pip install .`` (no extras)
imports ``sie_sdk`` and encodes over gRPC against a real server; its exported names are the
documented ones."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import venv
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import sie_sdk
import sie_sdk.client.errors
import sie_sdk.types
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

from tests.server_utils import ServerHandle, serving, write_catalog_entry
from tests.tiny_models import dense
from tests.tiny_models.entries import DENSE_OUTPUTS, entry

ROOT = Path(__file__).resolve().parents[2]
INSTALL_GUARD_S = 600.0

DOCUMENTED = {
    "sie_sdk": {"SIEClient", "SIEAsyncClient", "Item", "__version__"},
    "sie_sdk.types": {
        "Item", "ImageInput", "DocumentInput", "EncodeResult", "SparseResult", "ScoreResult",
        "ScoreEntry", "ExtractResult", "Entity", "Relation", "Classification", "ModelInfo",
        "TimingInfo", "DetectedObject", "ProfileInfo", "CapacityInfo",
    },
    "sie_sdk.client.errors": {
        "SIEError", "SIEConnectionError", "RequestError", "InputTooLongError", "ServerError",
        "ProvisioningError", "PoolError", "LoraLoadingError", "error_class", "error_from_detail",
    },
}  # fmt: skip


def test_exported_names_are_the_documented_ones() -> None:
    for module in (sie_sdk, sie_sdk.types, sie_sdk.client.errors):
        assert set(module.__all__) == DOCUMENTED[module.__name__], module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


@pytest_asyncio.fixture(loop_scope="session")
async def server(tmp_path: Path) -> AsyncIterator[ServerHandle]:
    weights = dense.build_tiny_dense(tmp_path / "dense")
    write_catalog_entry(tmp_path / "catalog", entry("tiny/dense", "dense", weights, DENSE_OUTPUTS))
    async with serving([tmp_path / "catalog"], ["tiny/dense"]) as handle:
        yield handle


CLIENT_SCRIPT = """
import json, sys
from sie_sdk import SIEClient
from sie_sdk.types import Item
with SIEClient(sys.argv[1]) as client:
    result = client.encode("tiny/dense", Item(text="Hello, world!"))
print(json.dumps({
    "dense": result["dense"].tolist(),
    "dtype": str(result["dense"].dtype),
    "torch": "torch" in sys.modules,
    "httpx": "httpx" in sys.modules,
}))
"""


@pytest.mark.slow
async def test_a_fresh_venv_with_no_extras_encodes_over_grpc(
    tmp_path: Path, server: ServerHandle
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = await asyncio.create_subprocess_exec(
        str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
        str(ROOT), env=pip_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(install.communicate(), INSTALL_GUARD_S)
    if install.returncode != 0 and b"No matching distribution" in output:
        pytest.skip(f"PyPI is unreachable: {output.decode()[-300:]}")
    assert install.returncode == 0, output.decode()[-2000:]

    listed = await asyncio.create_subprocess_exec(
        str(python), "-m", "pip", "list", "--format", "json", stdout=asyncio.subprocess.PIPE
    )
    listing, _ = await listed.communicate()
    installed = {p["name"].lower() for p in json.loads(listing)}
    assert "torch" not in installed
    assert {"grpcio", "numpy", "msgpack"} <= installed

    run = await asyncio.create_subprocess_exec(
        str(python), "-c", CLIENT_SCRIPT, server.address, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(run.communicate(), 120)
    assert run.returncode == 0, err.decode()
    got = json.loads(out)
    assert got["torch"] is False
    assert got["httpx"] is False
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    want = await stub.Encode(
        encode_pb2.EncodeRequest(model="tiny/dense", items=[common_pb2.Item(text="Hello, world!")])
    )
    assert got["dtype"] == "float32"
    assert np.array_equal(
        np.asarray(got["dense"], dtype=np.float32), from_tensor(want.items[0].dense.values)
    )
    assert sys.executable != str(python)
