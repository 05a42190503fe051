"""The SIE server under test: a subprocess, its readiness, its shutdown, its batch counters."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import grpc
from bench_common import HOST, MODEL, ROOT
from sie_sdk.v1 import status_pb2, status_pb2_grpc

SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 10.0


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ThreadTimes:
    """One thread's CPU seconds and the times it went to sleep (voluntary context switches)."""

    cpu_s: float
    sleeps: int


def thread_times(pid: int) -> dict[int, ThreadTimes]:
    """Every thread of a process, by thread id (Linux /proc; empty elsewhere)."""
    out: dict[int, ThreadTimes] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        sleeps = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.MULTILINE)
        out[tid] = ThreadTimes(
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
            int(sleeps.group(1)) if sleeps else 0,
        )
    return out


def cpu_delta(before: float | None, after: float | None) -> float | None:
    """CPU seconds between two ``cpu_s()`` readings, or None when either is unknown."""
    return None if before is None or after is None else after - before


class ServerProcess:
    """``python -m sie_server`` on 127.0.0.1 (a free port), stderr drained by a thread."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.port = 0
        self.log: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sie_server",
                "--host",
                HOST,
                "--port",
                "0",
                "--preload",
                MODEL,
                "--device",
                "cpu",
                "--dtype",
                dtype,
            ],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._drain, name=f"stderr-{dtype}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _drain(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:  # ends at EOF, when the process exits
            self.log.append(line.rstrip())
            if not self._listening.is_set():
                match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    self._listening.set()
            elif "ready:" in line:
                self._ready.set()

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> float:
        """Seconds until ``ready:``; raises with the log tail when it exits or times out."""
        started = time.monotonic()
        while not self._ready.wait(0.1):
            if self._process.poll() is not None:
                raise RuntimeError(f"server ({self.dtype}) exited early:\n{self.tail()}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(
                    f"server ({self.dtype}) not ready in {timeout_s}s:\n{self.tail()}"
                )
        return time.monotonic() - started

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.pid)

    def terminate(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = SERVER_STOP_TIMEOUT_S) -> int:
        """Exit code after SIGTERM; a server still alive after ``timeout_s`` is killed (-9)."""
        try:
            code = self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
            code = -9
        self._reader.join(5)
        return code

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])


@dataclass(frozen=True, slots=True)
class Counters:
    """The server's batch counters for MODEL (monotonic; compare by difference)."""

    tokens: float = 0.0
    padded_tokens: float = 0.0
    batches: float = 0.0
    batched_items: float = 0.0
    #: The ``sie_batch_size`` histogram: upper bounds and counts (one more count: overflow).
    size_buckets: tuple[float, ...] = ()
    size_counts: tuple[float, ...] = ()

    def __sub__(self, other: Counters) -> Counters:
        before = other.size_counts or (0.0,) * len(self.size_counts)
        return Counters(
            self.tokens - other.tokens,
            self.padded_tokens - other.padded_tokens,
            self.batches - other.batches,
            self.batched_items - other.batched_items,
            self.size_buckets,
            tuple(a - b for a, b in zip(self.size_counts, before, strict=True)),
        )

    def batch_sizes(self) -> dict[str, int]:
        """Non-empty histogram bins, labelled by the batch sizes they hold ("17-32": 12)."""
        bins: dict[str, int] = {}
        for i, count in enumerate(self.size_counts):
            if not count:
                continue
            if i == len(self.size_buckets):
                label = f">{self.size_buckets[-1]:g}"
            else:
                low = self.size_buckets[i - 1] + 1 if i else 1
                high = self.size_buckets[i]
                label = f"{high:g}" if low >= high else f"{low:g}-{high:g}"
            bins[label] = int(count)
        return bins


async def read_counters(address: str) -> Counters:
    """One snapshot of the status stream (its first message comes at once)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = status_pb2_grpc.StatusServiceStub(channel).WatchStatus(
            status_pb2.WatchStatusRequest(), timeout=STATUS_TIMEOUT_S
        )
        try:
            reply = await call.read()
        finally:
            call.cancel()
    if not isinstance(reply, status_pb2.WatchStatusResponse):
        raise RuntimeError("the status stream ended without a snapshot")

    def total(name: str) -> float:
        return float(
            sum(c.value for c in reply.counters if c.name == name and c.labels["model"] == MODEL)
        )

    sizes = next(
        (h for h in reply.histograms if h.name == "sie_batch_size" and h.labels["model"] == MODEL),
        None,
    )
    return Counters(
        tokens=total("sie_batch_tokens_total"),
        padded_tokens=total("sie_batch_padded_tokens_total"),
        batches=total("sie_batches_total"),
        batched_items=float(sizes.sum) if sizes else 0.0,
        size_buckets=tuple(float(b) for b in sizes.bounds) if sizes else (),
        size_counts=tuple(float(c) for c in sizes.counts) if sizes else (),
    )
