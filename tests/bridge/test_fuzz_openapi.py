"""Schema-driven fuzzing of the bridge from its own ``/openapi.json`` (schemathesis, a fixed seed
and a bounded budget): every generated request, valid or not, gets an answer that is not a server
fault, errors carry the documented body, and the server keeps serving afterwards.

The server and the bridge run as real processes (``scripts/run_services.py``), since schemathesis
calls them synchronously from the test thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from sie_bridge import openapi
from sie_sdk.wire import pack_msgpack

from tests.fuzz_profile import hypothesis_settings
from tests.server_utils import fake_entry, free_port, write_catalog_entry

ROOT = Path(__file__).resolve().parents[2]
MODEL = "fake/fuzz"
START_GUARD_S = 120.0
#: 5xx answers that are not faults: retryable states the documentation lists.
RETRYABLE = {503}

pytestmark = pytest.mark.slow


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: Any, value: Any) -> bytes:
    try:
        return pack_msgpack(value)
    except (TypeError, OverflowError):  # e.g. an integer past 64 bits: send garbage instead
        return json.dumps(value).encode()


schema = schemathesis.openapi.from_dict(openapi.document())
calls: list[int] = []


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    write_catalog_entry(folder / "catalog", fake_entry(MODEL))
    grpc_port, http_port = free_port(), free_port()
    log = (folder / "services.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable, str(ROOT / "scripts" / "run_services.py"), "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--",
            "--models-dir", str(folder / "catalog"), "--preload", MODEL,
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + START_GUARD_S
        while not _ready(url):
            assert process.poll() is None, (folder / "services.log").read_text()
            assert time.monotonic() < deadline, "the services never became ready"
            time.sleep(0.3)
        yield url
        assert _ready(url), "the server stopped serving under the fuzzer"
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@schema.parametrize()
@hypothesis_settings(30)
def test_no_request_is_a_server_fault(case: schemathesis.Case, live: str) -> None:
    if case.path == "/ws/status":
        pytest.skip("a WebSocket upgrade, not a request schemathesis can send")
    response = case.call(base_url=live, timeout=30)
    calls.append(response.status_code)
    status = response.status_code
    assert status < 500 or status in RETRYABLE, (case.method, case.path, status, response.text)
    if status >= 400 and case.path not in ("/readyz",):
        body = response.json()
        assert isinstance(body["detail"]["code"], str), body
        assert body["detail"]["message"], body


def test_the_fuzzer_ran_and_the_server_still_serves(live: str) -> None:
    # Runs after the fuzzing above (file order): the budget was spent, and a normal call works.
    assert len(calls) >= 50, f"only {len(calls)} fuzz cases ran"
    request = urllib.request.Request(
        f"{live}/v1/encode/{MODEL}",
        data=b'{"items": [{"text": "still here"}]}',
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    print(f"fuzzed the bridge with {len(calls)} requests: {sorted(set(calls))}")
