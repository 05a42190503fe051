"""The real process: `python -m sie_server` serves, and SIGTERM drains in-flight work and exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, status_pb2, status_pb2_grpc

from tests.fakes import expected_vector
from tests.server_utils import HANG_GUARD_S, fake_entry, serving, write_catalog_entry

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake/slow"
pytestmark = pytest.mark.slow


async def read_until(stream: asyncio.StreamReader, pattern: str, log: list[str]) -> re.Match[str]:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 60)).decode()
        if not line:
            raise AssertionError("server exited early:\n" + "".join(log))
        log.append(line)
        if match := re.search(pattern, line):
            return match


async def test_sigterm_drains_in_flight_work_and_exits_zero(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    write_catalog_entry(
        catalog,
        {
            "name": MODEL,
            "adapter": "tests.fakes:FakeAdapter",
            "weights_path": str(tmp_path),
            "max_sequence_length": 64,
            "outputs": {"dense": {"dims": 2}},
            "load_options": {"delay_s": 1.5},
        },
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sie_server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--models-dir",
        str(catalog),
        "--preload",
        MODEL,
        "--device",
        "cpu",
        "--drain-delay-s",
        "1.0",
        "--grace-period-s",
        "20",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    try:
        port = (await read_until(process.stderr, r"listening on 127\.0\.0\.1:(\d+)", log)).group(1)
        await read_until(process.stderr, r"ready:", log)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING
            encode = encode_pb2_grpc.EncodeServiceStub(channel)
            text = "work accepted before the signal"
            in_flight = asyncio.ensure_future(
                encode.Encode(
                    encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=text)])
                )
            )
            # Wait until the server holds the work (admitted, not resolved), then signal.
            status = status_pb2_grpc.StatusServiceStub(channel)
            async for snapshot in status.WatchStatus(status_pb2.WatchStatusRequest(interval_ms=50)):
                if any(m.queue_pending_items for m in snapshot.models):
                    break
            process.send_signal(signal.SIGTERM)
            await read_until(process.stderr, r"shutting down", log)
            # Readiness drops at once, while the drain delay still lets calls in.
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="sie.v1.EncodeService")
            )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            response = await asyncio.wait_for(in_flight, 30)
            assert list(from_tensor(response.items[0].dense.values)) == list(
                expected_vector(text, 64)
            )
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        log.append(rest.decode())
        assert await asyncio.wait_for(process.wait(), 30) == 0, "".join(log)
        assert "stopped" in "".join(log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_during_preload_never_serves_and_exits_zero(tmp_path: Path) -> None:
    # Warm-up runs several forward passes of 1.5 s each: the signal lands mid-preload.
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL, load_options={"delay_s": 1.5}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sie_server", "--host", "127.0.0.1", "--port", "0",
        "--models-dir", str(catalog), "--preload", MODEL, "--device", "cpu",
        "--drain-delay-s", "0.2", "--grace-period-s", "5",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    log: list[str] = []
    seen: list[int] = []
    try:
        port = (await read_until(process.stderr, r"listening on 127\.0\.0\.1:(\d+)", log)).group(1)
        await read_until(process.stderr, r"preloading", log)
        process.send_signal(signal.SIGTERM)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while process.returncode is None:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    seen.append(reply.status)
                except grpc.aio.AioRpcError:
                    pass  # the port closed: the server is stopping
                await asyncio.sleep(0.05)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        log.append(rest.decode())
        assert await asyncio.wait_for(process.wait(), 30) == 0, "".join(log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, "health answered while stopping"
    assert health_pb2.HealthCheckResponse.SERVING not in seen, "".join(log)
    assert "signal during preload" in "".join(log)


async def test_connections_are_closed_after_max_connection_age_and_clients_reconnect(
    tmp_path: Path,
) -> None:
    """--max-connection-age-s: the server ends an old connection (GOAWAY), the client's channel
    leaves READY, and its next call reconnects and succeeds."""
    write_catalog_entry(tmp_path / "catalog", fake_entry("fake/aged"))
    async with serving(
        [tmp_path / "catalog"], ["fake/aged"], max_connection_age_s=0.3, grace_period_s=1.0
    ) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        request = encode_pb2.EncodeRequest(model="fake/aged", items=[common_pb2.Item(text="hello")])
        await stub.Encode(request)
        assert handle.channel.get_state() is grpc.ChannelConnectivity.READY
        await asyncio.wait_for(
            handle.channel.wait_for_state_change(grpc.ChannelConnectivity.READY), HANG_GUARD_S
        )
        assert handle.channel.get_state() is not grpc.ChannelConnectivity.READY
        assert (await stub.Encode(request)).items[0].dense.dims == 2
