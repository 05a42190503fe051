"""``make run``'s supervisor (scripts/run_services.py): the server and the bridge start together,
SIGTERM stops both cleanly, and when one dies the other is stopped with a line saying why."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import pytest

from tests.server_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
START_GUARD_S = 120.0
STOP_GUARD_S = 60.0

pytestmark = pytest.mark.slow


def start(tmp_path: Path) -> tuple[subprocess.Popen[str], int, Path]:
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "run.log"
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        proc = _spawn(grpc_port, http_port, sink)
    return proc, http_port, log


def _spawn(grpc_port: int, http_port: int, sink: IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, str(ROOT / "scripts" / "run_services.py"),
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--", "--drain-delay-s", "0.1", "--grace-period-s", "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=sink,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def wait_ready(http_port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_GUARD_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the supervisor exited during startup"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError("the bridge never became ready")


def child_pids(log: Path) -> dict[str, int]:
    return {
        name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", log.read_text())
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_both_cleanly(tmp_path: Path) -> None:
    proc, http_port, log = start(tmp_path)
    try:
        wait_ready(http_port, proc)
        pids = child_pids(log)
        assert set(pids) == {"sie-server", "sie-bridge"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_GUARD_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(alive(pid) for pid in pids.values())
    assert "run_services: stopped" in log.read_text()


def test_when_the_server_dies_the_bridge_stops_too(tmp_path: Path) -> None:
    proc, http_port, log = start(tmp_path)
    try:
        wait_ready(http_port, proc)
        pids = child_pids(log)
        os.kill(pids["sie-server"], signal.SIGKILL)
        assert proc.wait(STOP_GUARD_S) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "sie-server exited with status -9; stopping sie-bridge" in text
    assert not alive(pids["sie-bridge"])
