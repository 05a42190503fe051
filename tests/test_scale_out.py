"""Scale-out: three server replicas on loopback behind the bridge (client-side ``round_robin``).
Under load one replica is SIGTERMed (it drains) and another SIGKILLed (its calls in flight are
lost with it): every request of SDK clients still succeeds, retried on another replica or
drained, and none is a 500."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_bridge.state import METRICS
from sie_sdk import SIEAsyncClient

from tests.bridge_utils import bridged
from tests.server_utils import (
    eventually,
    fake_entry,
    free_port,
    start_server_process,
    write_catalog_entry,
)

MODEL = "fake/replicated"
CLIENTS = 8
#: Bound on a replica starting (imports, preload) on a busy machine: a hang guard.
STARTUP_GUARD_S = 120.0
pytestmark = pytest.mark.slow


async def _serving(address: str) -> None:
    deadline = time.monotonic() + STARTUP_GUARD_S
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"replica {address} never became SERVING"
            await asyncio.sleep(0.2)


async def test_replicas_behind_the_bridge_lose_no_request_to_sigterm_or_sigkill(
    tmp_path: Path,
) -> None:
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, fake_entry(MODEL, load_options={"delay_s": 0.05}))
    ports = [free_port() for _ in range(3)]
    replicas = [
        await start_server_process(
            catalog, port, MODEL, "--drain-delay-s", "0.5", "--grace-period-s", "20"
        )
        for port in ports
    ]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    stop = asyncio.Event()
    try:
        await asyncio.gather(*(_serving(address) for address in addresses))
        async with bridged(",".join(addresses)) as http:
            sdk = SIEAsyncClient(http.url, transport="http", timeout_s=60.0)

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    try:
                        result = await sdk.encode(MODEL, {"text": f"c{n} call {i}"})
                        assert not isinstance(result, list)
                        assert result["dense"].shape == (2,)
                        outcomes["ok"] += 1
                    except Exception as exc:  # the test's subject: any failure is reported
                        failures.append(f"{type(exc).__name__}: {exc}")
                    i += 1

            try:
                clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
                await eventually(lambda: outcomes["ok"] >= 40, "traffic flows")
                replicas[0].send_signal(signal.SIGTERM)
                mark = outcomes["ok"]
                await eventually(lambda: outcomes["ok"] >= mark + 40, "traffic after SIGTERM")
                replicas[1].send_signal(signal.SIGKILL)
                mark = outcomes["ok"]
                await eventually(lambda: outcomes["ok"] >= mark + 40, "traffic after SIGKILL")
                assert await asyncio.wait_for(replicas[0].wait(), 60) == 0, "the drain exits 0"
                statuses = {
                    labels["status"]: value
                    for name, labels, value in http.bridge.runner.app[METRICS].counters()
                    if name == "sie_bridge_requests_total" and labels["method"] == "POST"
                }
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 90)
                await sdk.close()
    finally:
        for process in replicas:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert failures == [], failures[:5]
    assert outcomes["ok"] >= 120
    # The kill cost calls in flight: the bridge answered them 503 and the SDK retried them.
    assert set(statuses) <= {"200", "503"}, statuses
    assert statuses.get("503", 0) >= 1, statuses
