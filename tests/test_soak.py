"""The soak's one-minute version (the ten-minute one is ``bench/bench_soak.py``'s default): mixed
encode, score and extract on both transports, with deadlines and cancellations, gives zero
unexpected errors, and the server exits cleanly afterwards. Memory is held to 5% growth by the
ten-minute run; in one minute the largest batches of three models may still be arriving after
the warm-up, so this version only catches gross growth (25%)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_one_minute_mixed_soak_has_no_unexpected_errors_and_flat_memory(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/bench_soak.py"),
            *("--seconds", "60", "--rss-limit", "0.25", "--out", str(out)),
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["unexpected_errors"] == 0, result["unexpected_examples"]
    # Every kind of call succeeded on both transports, and the planted failures happened.
    assert set(result["ok"]) == {
        f"{transport}/{kind}"
        for transport in ("grpc", "http")
        for kind in ("encode", "score", "extract")
    }
    expected = result["expected_failures"]
    assert any(key.endswith("/deadline") for key in expected), expected
    assert any(key.endswith("/cancelled") for key in expected), expected
    assert all(growth < 0.25 for growth in result["rss_growth"].values()), result["rss_mb"]
    assert result["server_exit_code"] == 0
    assert run.returncode == 0
