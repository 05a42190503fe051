"""Helper threads run torch's operators without an OpenMP team of their own
(engine/openmp.py): such a team, alive beside the compute thread's, makes every team's workers
sleep at each barrier once the process holds more of them than cores.

The thread counts are read in a fresh interpreter, where no other test's threads come and go."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sie_server.engine import openmp
from sie_server.engine.openmp import torch_openmp

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or torch.get_num_threads() < 2,
    reason="OpenMP teams exist with 2 or more torch threads; the runtime is found on Linux",
)

PROBE = textwrap.dedent(
    """
    import json, os, sys
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from sie_server.engine.openmp import serial_openmp

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    def parallel_op():
        (torch.ones(4_000_000) * 2).sum()  # large enough to run as a parallel region
        return torch.get_num_threads()

    initializer = serial_openmp if sys.argv[1] == "serial" else None
    main = torch.get_num_threads()
    before = os_threads()
    with ThreadPoolExecutor(1, initializer=initializer) as pool:
        count = pool.submit(parallel_op).result()
        new_threads = os_threads() - before
    print(json.dumps({"main": main, "count": count, "new_threads": new_threads,
                      "main_after": torch.get_num_threads()}))
    """
)


def test_torchs_openmp_runtime_is_found() -> None:
    runtime = torch_openmp()
    assert runtime is not None
    assert hasattr(runtime, "omp_set_num_threads")


def probe(pool: str) -> dict[str, int]:
    """One pool thread (``serial``: started with serial_openmp; ``plain``) runs a parallel op,
    in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, pool], capture_output=True, text=True, timeout=120, check=True
    )
    out: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_a_helper_thread_runs_torch_serially_and_makes_no_team() -> None:
    plain, serial = probe("plain"), probe("serial")
    main = plain["main"]
    # A plain pool thread brings its own team along: itself and its worker threads.
    assert (plain["count"], plain["new_threads"]) == (main, main)
    # A pool thread started with serial_openmp runs the op alone: one new thread, no team, and
    # the other threads keep their count.
    assert (serial["count"], serial["new_threads"]) == (1, 1)
    assert serial["main_after"] == main


def test_a_failure_to_find_the_runtime_never_breaks_a_pool(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool whose initializer raises refuses every task: serial_openmp only logs."""

    def broken() -> None:
        raise OSError("no such runtime")

    monkeypatch.setattr(openmp, "torch_openmp", broken)
    with ThreadPoolExecutor(1, initializer=openmp.serial_openmp) as pool:
        assert pool.submit(lambda: 41 + 1).result(timeout=30) == 42
    assert "could not keep a helper thread out of torch's OpenMP teams" in caplog.text
