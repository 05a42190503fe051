"""Choosing the device and compute dtype once, at startup."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEVICES_HELP = "auto (cuda when present, else cpu), cpu, cuda, cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Default token budget of one batch (``--max-batch-tokens 0``) on a GPU, where bigger batches
#: keep the device busy, and on a CPU, where a batch past about 2k tokens runs each text slower
#: (its activations outgrow the caches): at 32 clients long texts served 19.7 texts/s at 16384
#: and 24.2 at 2048, mixed 39.3 and 41.3, medium the same (docs/performance.md, "The CPU token
#: budget").
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class Placement:
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "bfloat16", "float16"
    #: Normalized accelerator type for status ("cpu", "h100", "l4", ...).
    gpu_type: str = "cpu"


def resolve_placement(device: str, dtype: str) -> Placement:
    """``auto`` picks CUDA with bf16 (fp16 where bf16 is unsupported), else CPU with fp32."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        device = f"cuda:{index}"
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Placement(device, dtype, gpu_type=gpu_type_of(torch.cuda.get_device_name(index)))
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}: {DEVICES_HELP}")
    dtype = "float32" if dtype == "auto" else dtype
    if dtype != "float32" and not cpu_computes_natively(dtype):
        logger.warning(
            "--dtype %s on a CPU without native %s matrix multiplies: torch emulates them, "
            "about 5x slower than float32 (docs/performance.md); use float32 here",
            dtype,
            dtype,
        )
    return Placement("cpu", dtype)


def cpu_computes_natively(dtype: str) -> bool:
    """Whether oneDNN has native matrix multiplies for ``dtype`` on this CPU (bf16: AVX512_BF16
    or AMX; fp16: AVX512_FP16 or AMX-FP16). Without them torch emulates the type, slowly."""
    import torch

    name = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}
    check = getattr(torch.ops.mkldnn, name.get(dtype, ""), None)
    return dtype == "float32" or (check is not None and bool(check()))


def default_batch_tokens(placement: Placement) -> int:
    """The token budget of a batch when ``--max-batch-tokens`` is 0 (auto)."""
    return CPU_BATCH_TOKENS if placement.device == "cpu" else GPU_BATCH_TOKENS


#: Where ``--compute-workers 0`` runs two passes side by side: torch's thread count at which it
#: was measured to win (one thread a pass, no second OpenMP team; engine/compute_lane.py).
AUTO_SIDE_BY_SIDE_THREADS = 2


def compute_layout(placement: Placement, workers: int) -> tuple[int, int]:
    """The shared compute lane's (torch threads, workers) for ``--compute-workers`` (0: auto).
    On the CPU, auto is two workers, one thread each, where torch has two threads (measured:
    engine/compute_lane.py), else one; never more workers than threads. On a GPU, one worker
    and torch's threads left as they are."""
    if placement.device != "cpu":
        return 0, 1
    import torch

    threads = torch.get_num_threads()
    if workers == 0:
        workers = 2 if threads == AUTO_SIDE_BY_SIDE_THREADS else 1
    return threads, min(workers, threads)


def gpu_type_of(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb'; 'NVIDIA L4' -> 'l4'."""
    words = name.lower().replace("nvidia", "").split()
    kind = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")
    memory = next((w for w in words if w.endswith("gb")), None)
    return f"{kind}-{memory}" if memory else kind
