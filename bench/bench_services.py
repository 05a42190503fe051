"""Subprocesses the scoreboard talks to over HTTP: our bridge, and the peers.

Each runs in its own session with its output drained by a thread into a short log (shown when it
fails). Readiness: the bridge prints ``sie-bridge listening on HOST:PORT`` (it is started on port
0); a peer is ready when its ``ready_path`` answers 200. Stop: SIGTERM, then SIGKILL after a
bound. CPU: user + system seconds of the process and all its live descendants (psutil), so a
server that forks workers is counted whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence

import psutil  # type: ignore[import-untyped]
from bench_common import HOST, ROOT

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants, or None when it is gone."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """A subprocess serving HTTP on 127.0.0.1."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        port: int = 0,
        ready_path: str | None = None,
        port_pattern: str | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.ready_path = ready_path
        self.log: deque[str] = deque(maxlen=200)
        self._port_pattern = re.compile(port_pattern) if port_pattern else None
        self._port_seen = threading.Event()
        self._process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, name=f"log-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _drain(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.log.append(line.rstrip())
            if self._port_pattern and not self._port_seen.is_set():
                match = self._port_pattern.search(line)
                if match:
                    self.port = int(match.group(1))
                    self._port_seen.set()

    def _answers(self) -> bool:
        if self._port_pattern and not self._port_seen.is_set():
            return False
        if self.ready_path is None:
            return True
        try:
            with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until it answers; raises with the log tail when it exits or times out."""
        started = time.monotonic()
        while not self._answers():
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{self.name} not ready in {timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(0.25)
        return time.monotonic() - started

    def cpu_s(self) -> float | None:
        return tree_cpu_s(self.pid)

    def stop(self) -> int:
        """SIGTERM to its process group; SIGKILL after STOP_TIMEOUT_S. The exit code."""
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
        try:
            code = self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)
            code = -9
        self._reader.join(5)
        return code

    def tail(self, lines: int = 25) -> str:
        return "\n".join(list(self.log)[-lines:])


def bridge(grpc_address: str) -> Service:
    """Our HTTP bridge in front of the gRPC server at ``grpc_address``."""
    return Service(
        "sie-bridge",
        [
            sys.executable,
            "-m",
            "sie_bridge",
            "--host",
            HOST,
            "--port",
            "0",
            "--backend",
            grpc_address,
        ],
        dict(os.environ),
        port_pattern=r"sie-bridge listening on [\d.]+:(\d+)",
    )
