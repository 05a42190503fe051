"""Starting a real sie-server in the test's event loop on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from sie_server.config import Settings
from sie_server.grpc_api.server import RunningServer, build_registry, create_server

from tests.fakes import FakeAdapter

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerHandle:
    running: RunningServer
    channel: grpc.aio.Channel
    address: str


@asynccontextmanager
async def serving(
    models_dir: Sequence[Path] = (), preload: Sequence[str] = (), **overrides: Any
) -> AsyncIterator[ServerHandle]:
    """A started server (preloaded models loaded, health SERVING) and a channel to it."""
    settings = Settings(
        **{
            "host": "127.0.0.1",
            "port": 0,
            "models_dir": tuple(models_dir),
            "preload": tuple(preload),
            "device": "cpu",
            **overrides,
        }
    )
    registry = build_registry(settings)
    running = await create_server(settings, registry)
    try:
        for name in preload:
            await registry.load(name)
        await running.set_serving(True)
        address = f"127.0.0.1:{running.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            yield ServerHandle(running, channel, address)
    finally:
        await running.stop(1.0)


def fake_entry(name: str, **fields: Any) -> dict[str, Any]:
    """A catalog entry serving the fake adapter (dense, 2 dims), with ``fields`` added."""
    return {
        "name": name,
        "adapter": "tests.fakes:FakeAdapter",
        "weights_path": str(Path(__file__).parent),  # the fake reads no weights
        "max_sequence_length": 64,
        "outputs": {"dense": {"dims": 2}},
        **fields,
    }


@asynccontextmanager
async def fake_model_server(
    tmp_path: Path, model: str, entry: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[ServerHandle]:
    """A started server with one fake model preloaded (``entry``: fields added to its catalog
    entry), configured by ``overrides``."""
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(model, **(entry or {})))
    async with serving([catalog], preload=[model], **overrides) as handle:
        yield handle


def fake_adapter(handle: ServerHandle, model: str) -> FakeAdapter:
    """The loaded fake adapter of ``model`` (to hold and release its passes)."""
    adapter = handle.running.registry.entry(model).adapter
    assert isinstance(adapter, FakeAdapter)
    return adapter


def free_port() -> int:
    """A port nothing listens on now (for a process that must be restarted on the same one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_catalog_entry(folder: Path, entry: dict[str, Any]) -> Path:
    """Write one catalog YAML into ``folder`` (created), named after the model."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (str(entry["name"]).replace("/", "__") + ".yaml")
    path.write_text(yaml.safe_dump(entry, sort_keys=False))
    return path


#: Bytes that do not parse as a message: field 1 with a length far past the message's end.
CORRUPT = b"\x0a\xff\xff\xff\xff\x0f"


def error_info(exc: grpc.RpcError) -> tuple[str, dict[str, str], float | None]:
    """(ErrorInfo.reason, ErrorInfo.metadata, RetryInfo delay in seconds or None) of a failed call."""
    from google.rpc import error_details_pb2, status_pb2

    trailers = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    raw = next(v for k, v in trailers if k == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    reason, metadata, retry = "", {}, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            delay = error_details_pb2.RetryInfo()
            detail.Unpack(delay)
            retry = delay.retry_delay.ToTimedelta().total_seconds()
    return reason, metadata, retry


HANG_GUARD_S = 10.0


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait (polling the loop) until ``condition`` holds; a hang guard, not a timing check."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


async def start_server_process(
    catalog: Path, port: int, preload: str, *flags: str
) -> asyncio.subprocess.Process:
    """``python -m sie_server`` as a child process on 127.0.0.1:``port`` (CPU), serving
    ``catalog`` with ``preload`` loaded, plus ``flags``; its stderr is dropped."""
    root = REPO_ROOT
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sie_server", "--host", "127.0.0.1", "--port", str(port),
        "--models-dir", str(catalog), "--preload", preload, "--device", "cpu", *flags,
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
