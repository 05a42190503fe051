"""SIGTERM under load on both transports loses no accepted request: every call sent before the
signal completes with its result, and calls after it are either served (during the drain delay)
or refused with a retryable answer (UNAVAILABLE / 503), never a fault or a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

from tests.bridge_utils import bridged
from tests.server_utils import (
    HANG_GUARD_S,
    eventually,
    fake_entry,
    free_port,
    write_catalog_entry,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake/sigterm"
CLIENTS = 8  # per transport
pytestmark = pytest.mark.slow


async def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL, load_options={"delay_s": 0.05}))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sie_server", "--host", "127.0.0.1", "--port", str(port),
        "--models-dir", str(tmp_path / "catalog"), "--preload", MODEL, "--device", "cpu",
        "--drain-delay-s", "0.5", "--grace-period-s", "20",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    signalled = asyncio.Event()
    signal_at = 0.0
    outcomes: list[tuple[str, float, str]] = []  # (transport, sent at, outcome)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, "the server never became ready"
                await asyncio.sleep(0.2)
            stub = encode_pb2_grpc.EncodeServiceStub(channel)

            async def grpc_client(n: int) -> None:
                for i in range(1000):
                    sent = time.monotonic()
                    request = encode_pb2.EncodeRequest(
                        model=MODEL, items=[common_pb2.Item(text=f"g{n} call {i}")]
                    )
                    try:
                        await stub.Encode(request, timeout=HANG_GUARD_S)
                        outcomes.append(("grpc", sent, "ok"))
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append(("grpc", sent, exc.code().name))
                        if signalled.is_set():
                            return

            async with bridged(address, request_timeout_s=HANG_GUARD_S) as http:

                async def http_client(n: int) -> None:
                    for i in range(1000):
                        sent = time.monotonic()
                        body = {"items": [{"text": f"h{n} call {i}"}]}
                        try:
                            async with http.session.post(f"/v1/encode/{MODEL}", json=body) as r:
                                await r.read()
                                outcomes.append(("http", sent, str(r.status)))
                                done = r.status != 200
                        except aiohttp.ClientError as exc:
                            outcomes.append(("http", sent, type(exc).__name__))
                            done = True
                        if done and signalled.is_set():
                            return

                clients = [
                    *(asyncio.create_task(grpc_client(n)) for n in range(CLIENTS)),
                    *(asyncio.create_task(http_client(n)) for n in range(CLIENTS)),
                ]
                await eventually(lambda: len(outcomes) >= 40, "traffic flows on both transports")
                signal_at = time.monotonic()
                process.send_signal(signal.SIGTERM)
                signalled.set()
                await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    before = [o for o in outcomes if o[1] < signal_at]
    after = [o for o in outcomes if o[1] >= signal_at]
    assert {o[0] for o in before} == {"grpc", "http"}
    # The last call of each client was in flight at the signal: it was accepted, and completes.
    assert all(result in ("ok", "200") for _, _, result in before), before
    refused = {result for _, _, result in after if result not in ("ok", "200")}
    assert refused <= {"UNAVAILABLE", "503"}, refused
