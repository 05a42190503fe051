"""The memory budget of the loaded models: what counts as used, and what a model will need.

``--memory-budget-mb`` bounds the memory in use, measured by one of two gauges:

* ``process`` (default): on CUDA, the bytes torch has allocated on the device; on CPU, the
  server process's RSS. It sees everything (activations, caches, tokenizers), so the budget is
  what the machine has to give.
* ``weights``: the sum of the loaded models' parameters and buffers. It ignores the rest, but it
  does not move with load, so it suits several servers sharing one device, and tests.

Before a model loads, the least recently used loaded models are evicted until the gauge plus
the model's estimated size fits the budget (its size as measured at its last load, else the size
of its weight files, else nothing); after the load, again until the gauge fits. A model is never
evicted to load itself, and the one model left is kept even over budget (with a warning).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

GAUGES = ("process", "weights")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")


def process_gauge(device: str) -> Callable[[], int]:
    """Bytes in use by this process on ``device``: CUDA's allocated bytes, or the RSS."""
    if device.startswith("cuda"):

        def cuda_allocated() -> int:
            torch = sys.modules["torch"]
            return int(torch.cuda.memory_allocated(device))

        return cuda_allocated
    import psutil  # type: ignore[import-untyped]

    process = psutil.Process()

    def rss() -> int:
        return int(process.memory_info().rss)

    return rss


def weights_gauge(loaded_bytes: Callable[[], Iterable[int]]) -> Callable[[], int]:
    def total() -> int:
        return sum(loaded_bytes())

    return total


def weight_files_bytes(source: str) -> int:
    """The size of the weight files in a local model folder and its subfolders, one level down
    (0 for a hub id: unknown until it is downloaded)."""
    folder = Path(source)
    if not folder.is_dir():
        return 0
    return sum(
        path.stat().st_size
        for pattern in ("*", "*/*")
        for path in folder.glob(pattern)
        if path.name.endswith(WEIGHT_SUFFIXES) and path.is_file()
    )
