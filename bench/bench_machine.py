"""The machine's facts and its practical matmul rate, turned into a texts/s bound for the model.

The bound: a BERT encoder layer of width h, FFN width 4h, on a sequence of n tokens costs

    FLOPs(layer, n) = 24 h^2 n + 4 h n^2

(Q, K, V and the output projection: 4 * 2 h^2 per token; the FFN: 2 * 2 * 4 h^2 per token; the
attention scores Q K^T and the weighted sum A V: 2 * 2 h n per token; one multiply-add is two
FLOPs; softmax, layer norms, GELU and the embeddings are left out). A text of n tokens costs
``layers * FLOPs(layer, n)``. The GEMM probe times ``torch.matmul`` on this model's own shapes
([T x h] x [h x h], [h x 4h], [4h x h], T tokens of a typical batch) and weighs them as one
layer does, so ``rate / FLOPs(text)`` is the texts/s this machine could reach if every FLOP ran
at its measured matmul rate, with no padding, no attention overhead and no Python: an upper
bound that every row of the scoreboard also reads as a share of.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The CPU flags that decide which kernels oneDNN and MKL can use.
INTERESTING_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the FLOPs formula needs: width, layers, FFN width."""

    hidden: int
    layers: int
    intermediate: int

    def flops_per_text(self, tokens: int) -> float:
        h, n = self.hidden, tokens
        per_layer = 8 * h * h * n + 4 * h * self.intermediate * n + 4 * h * n * n
        return float(self.layers * per_layer)


def cpu_facts() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": [f for f in INTERESTING_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def torch_facts() -> dict[str, Any]:
    import torch

    config = torch.__config__.show()
    onednn = next(
        (line.strip() for line in config.splitlines() if "oneDNN" in line or "MKL-DNN" in line),
        "unknown",
    )
    mkl = next((line.strip() for line in config.splitlines() if "Math Kernel" in line), "none")
    mkldnn: Any = torch.backends.mkldnn
    bf16_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {
        "torch": torch.__version__,
        "onednn": onednn,
        "mkl": mkl,
        "mkldnn_available": bool(mkldnn.is_available()),
        "onednn_bf16": bool(bf16_check()) if bf16_check is not None else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version()}
    for name in ("transformers", "sentence-transformers", "grpcio", "aiohttp", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def gemm_probe(shape: ModelShape, tokens: int, seconds: float) -> dict[str, Any]:
    """fp32 matmul FLOP/s on the model's layer shapes for ``tokens`` rows, weighted as a layer.

    Each shape runs for about ``seconds / 3`` (after two warm-up calls); the best of three
    timings per shape counts, since other work on a shared machine only ever slows it down."""
    import torch

    h, f = shape.hidden, shape.intermediate
    # (k, n, how many such matmuls per layer): Q, K, V, out; FFN up; FFN down.
    shapes = ((h, h, 4), (h, f, 1), (f, h, 1))
    per_shape: dict[str, float] = {}
    layer_s = layer_flops = 0.0
    with torch.inference_mode():
        for k, n, count in shapes:
            a, b = torch.randn(tokens, k), torch.randn(k, n)
            for _ in range(2):
                torch.matmul(a, b)
            best = float("inf")
            for _ in range(3):
                reps, started = 0, time.perf_counter()
                while True:
                    torch.matmul(a, b)
                    reps += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= seconds / 9:
                        break
                best = min(best, elapsed / reps)
            flops = 2.0 * tokens * k * n
            per_shape[f"[{tokens}x{k}]x[{k}x{n}]"] = flops / best
            layer_s += count * best
            layer_flops += count * flops
    return {
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "flops_per_s_by_shape": per_shape,
        "flops_per_s": layer_flops / layer_s,
    }
