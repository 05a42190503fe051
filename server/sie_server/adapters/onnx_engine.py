"""The optional ONNX Runtime engine: a family's transformer exported to ONNX once, cached on disk,
and run by an ORT ``InferenceSession`` in place of the torch forward pass.

Only the transformer (ids and attention mask in, last hidden state out) is exported; pooling,
heads and normalization stay in the family's torch code, so both engines share every step after
the forward pass. onnxruntime is imported only when a model asks for this engine: the server
imports and serves without it, and asking for it without it installed is ``ModelLoadFailed``
naming ``pip install 'sie[onnx]'``.

Export: the TorchScript exporter with eager attention (an SDPA graph hides the attention pattern
from ORT), dynamic ``batch`` and ``seq`` axes, then ORT's transformer optimizer (``bert``:
fused Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu). The optimized graph
is kept only when it matches torch on a padded probe batch (else the plain export is); a graph
that does not match torch at all fails the load. The session runs with ``ORT_ENABLE_ALL`` on the
CPU execution provider with torch's intra-op thread count. CPU and float32 only: any other
device or dtype is refused (``ModelLoadFailed``), never silently run elsewhere.

``onnx-int8``: the float32 graph above (exported first when it is not cached), with ORT's dynamic
quantization (``quantize_dynamic``): every MatMul's weights in int8 per output channel, its
activations quantized per batch at run time. It trades accuracy for speed (for all-MiniLM-L6-v2
on an AVX2 host about 1.7-2x torch and 1.4-1.5x the float32 graph, vectors within cosine
0.97-0.98 of torch's, 0.99 on average: docs/performance.md), so it is a separate engine a deployment chooses, never a silent fallback;
the quantized graph is kept only when the mean-pooled probe states stay within
``INT8_MIN_COSINE`` of torch's.

Cache: ``$HF_HOME/sie-onnx/<key>/<dtype>/model.onnx`` (HF_HOME as huggingface_hub resolves it),
and the quantized graph in ``<key>/<dtype>-int8/``.
``key`` is a sha256 over the export format version, the torch version, the model class, and the
name, size and mtime of every file at the top of the model's folder (for a hub model, the files
of its snapshot: their real paths name the blobs by content hash), so a changed checkpoint
re-exports and an unchanged one never does. A finished export is written into a temporary folder
and renamed into place, so a half-written cache entry is never read; two processes exporting at
once both succeed and one of the two identical results stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sie_server.adapters.base import ModelAdapter
from sie_server.adapters.hf import model_file
from sie_server.catalog import CatalogError, ModelSpec
from sie_server.domain import ENGINES, LoadTarget
from sie_server.errors import ModelLoadFailed

#: Bump when the exported graph changes for the same weights (forces a re-export).
EXPORT_FORMAT = "1"
INSTALL_HINT = "pip install 'sie[onnx]'"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "last_hidden_state"
#: Probe agreement a graph must reach against torch (max abs difference on the hidden states).
TOLERANCE = 1e-3
#: Larger models keep their weights in a file beside the graph (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30
#: The engines this module runs: float32, and float32 with int8 MatMul weights.
ONNX_ENGINES = frozenset({"onnx", "onnx-int8"})
#: Probe agreement a quantized graph must reach: the least cosine between its mean-pooled hidden
#: states and torch's, per probe sequence.
INT8_MIN_COSINE = 0.97


def resolve_engine(adapter_cls: type[ModelAdapter], spec: ModelSpec, flag: str) -> str:
    """The engine a model loads with: the ``--engine`` flag (torch / onnx) for every family that
    supports it, the catalog's ``engine`` when the flag is ``auto``. A catalog engine the family
    does not support is a CatalogError; a flag it does not support falls back to torch."""
    supported = adapter_cls.engines
    if flag in ENGINES:
        return flag if flag in supported else "torch"
    if spec.engine not in supported:
        raise CatalogError(
            f"{spec.name}: engine {spec.engine!r} is not supported by adapter {spec.adapter!r} "
            f"(it runs: {', '.join(sorted(supported))})"
        )
    return spec.engine


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "sie-onnx"


def cache_key(folder: Path, model_class: str) -> str:
    import torch

    digest = hashlib.sha256(f"{EXPORT_FORMAT}\0{torch.__version__}\0{model_class}".encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = path.stat()  # follows a snapshot's symlink to its blob
        real = path.resolve().name
        digest.update(f"\0{path.name}\0{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


class OnnxEncoder:
    """An ORT session over an exported transformer: padded ids and mask in, hidden states out."""

    session: Any
    path: Path
    #: The graph's files on disk (about the weights ORT holds).
    weight_bytes: int
    #: Exports and quantizations done in this process (a cache hit does neither).
    exports: ClassVar[int] = 0

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        self.weight_bytes = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())

    @classmethod
    def open(cls, model: Any, target: LoadTarget, name: str) -> OnnxEncoder:
        """The cached session for ``model`` (exporting it first when not cached)."""
        ort = require(target, name)
        config = model_file(target.source, "config.json")  # in the folder or hub snapshot
        if config is None:
            raise ModelLoadFailed(f"{name}: no config.json to key the ONNX cache", model=name)
        folder = cache_root() / cache_key(config.parent, type(model).__name__)
        final = folder / target.dtype
        if not (final / "model.onnx").is_file():
            export_into(model, final, ort, name)
        if target.engine == "onnx-int8":
            source, final = final, folder / f"{target.dtype}-int8"
            if not (final / "model.onnx").is_file():
                quantize_into(model, source / "model.onnx", final, ort, name)
        return cls(session(ort, final / "model.onnx"), final / "model.onnx")

    def __call__(self, ids: Any, mask: Any) -> Any:
        """Hidden states [batch, seq, dim] as a float32 torch tensor (ids and mask: int64)."""
        import torch

        feed = {INPUTS[0]: ids.numpy(), INPUTS[1]: mask.numpy()}
        (hidden,) = self.session.run([OUTPUT], feed)
        return torch.from_numpy(np.asarray(hidden, dtype=np.float32))


def require(target: LoadTarget, name: str) -> Any:
    """onnxruntime, when it is installed and the target is cpu / float32 (ModelLoadFailed
    otherwise); a family calls it before loading torch weights, to fail early."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        raise ModelLoadFailed(
            f"{name}: engine {target.engine} needs onnxruntime, which is not installed "
            f"({INSTALL_HINT})",
            model=name,
        ) from None
    if target.device != "cpu" or target.dtype != "float32":
        raise ModelLoadFailed(
            f"{name}: engine {target.engine} runs on cpu in float32 only, this server places "
            "models on "
            f"{target.device} in {target.dtype} (use --engine torch, or --device cpu --dtype "
            "float32)",
            model=name,
        )
    return ort


def session(ort: Any, path: Path) -> Any:
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_into(model: Any, final: Path, ort: Any, name: str) -> None:
    """Export, optimize and check ``model`` in a temporary folder, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        probe = probe_inputs(model)
        with eager_attention(model), quiet():
            want = model(**probe).last_hidden_state.numpy()
            export(model, work / "plain.onnx", probe)
        differs = check(ort, work / "plain.onnx", probe, want)
        if differs is not None:
            raise ModelLoadFailed(
                f"{name}: the ONNX export differs from torch ({differs})", model=name
            )
        if optimize(model, work / "plain.onnx", work / "model.onnx") and (
            check(ort, work / "model.onnx", probe, want) is None
        ):
            for path in work.glob("plain.onnx*"):
                path.unlink()
        else:
            for path in work.glob("plain.onnx*"):
                path.rename(work / path.name.replace("plain.onnx", "model.onnx"))
        OnnxEncoder.exports += 1
        with contextlib.suppress(OSError):  # another process finished first: as good as ours
            work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantize_into(model: Any, source: Path, final: Path, ort: Any, name: str) -> None:
    """Quantize the float32 graph at ``source`` in a temporary folder, check it against torch
    on the probe, then rename it to ``final``."""
    import torch

    quantization = importlib.import_module("onnxruntime.quantization")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        probe = probe_inputs(model)
        with quiet(), torch.inference_mode():
            want = model(**probe).last_hidden_state.numpy()
            quantization.quantize_dynamic(
                str(source),
                str(work / "model.onnx"),
                weight_type=quantization.QuantType.QInt8,
                per_channel=True,
                # fused ops (Attention, SkipLayerNormalization) defeat its type inference
                extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
            )
        feed = {k: v.numpy() for k, v in probe.items()}
        (got,) = session(ort, work / "model.onnx").run([OUTPUT], feed)
        cosine = pooled_cosine(np.asarray(got), want, feed[INPUTS[1]])
        if cosine < INT8_MIN_COSINE:
            raise ModelLoadFailed(
                f"{name}: the int8 graph's vectors drift from torch's (cosine {cosine:.4f} on a "
                f"probe batch, below {INT8_MIN_COSINE}); use --engine onnx",
                model=name,
            )
        OnnxEncoder.exports += 1
        with contextlib.suppress(OSError):  # another process finished first: as good as ours
            work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pooled_cosine(got: Any, want: Any, mask: Any) -> float:
    """The least cosine, over the batch, between mean-pooled hidden states."""
    weights = mask[..., None].astype(np.float32)

    def pool(states: Any) -> Any:
        return (states * weights).sum(1) / weights.sum(1)

    a, b = pool(got), pool(want)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosine.min())


def probe_inputs(model: Any) -> dict[str, Any]:
    """A padded batch of two: the export traces it, the check compares on it."""
    import torch

    vocab = int(model.config.vocab_size)
    ids = torch.randint(min(1000, vocab - 1), vocab, (2, 12), generator=torch.Generator())
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {INPUTS[0]: ids, INPUTS[1]: mask}


def export(model: Any, path: Path, probe: dict[str, Any]) -> None:
    import torch

    class Transformer(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        Transformer(model).eval(),
        (probe[INPUTS[0]], probe[INPUTS[1]]),
        str(path),
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        dynamic_axes={INPUTS[0]: axes, INPUTS[1]: axes, OUTPUT: axes},
        opset_version=17,
        dynamo=False,
    )


def optimize(model: Any, source: Path, target: Path) -> bool:
    """ORT's BERT fusions (Attention, EmbedLayerNormalization, ...); False when unavailable."""
    try:
        optimizer = importlib.import_module("onnxruntime.transformers.optimizer")
        config = model.config
        with quiet():
            optimized = optimizer.optimize_model(
                str(source),
                model_type="bert",
                num_heads=int(config.num_attention_heads),
                hidden_size=int(config.hidden_size),
                opt_level=0,
                use_gpu=False,
            )
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            optimized.save_model_to_file(
                str(target), use_external_data_format=size > EXTERNAL_DATA_BYTES
            )
    except Exception:  # an architecture its fusions do not know: the plain graph serves
        return False
    return True


def check(ort: Any, path: Path, probe: dict[str, Any], want: Any) -> str | None:
    """None when the graph's hidden states match torch's on the probe, else the difference."""
    feed = {k: v.numpy() for k, v in probe.items()}
    (got,) = session(ort, path).run([OUTPUT], feed)
    keep = feed[INPUTS[1]].astype(bool)  # padded positions' states are never pooled
    diff = float(np.abs(np.asarray(got)[keep] - want[keep]).max())
    return None if diff <= TOLERANCE else f"max difference {diff:.2e} on a probe batch"


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Eager attention while exporting (ORT fuses its pattern), then the model's own again;
    outside inference mode, which tracing does not support."""
    import torch

    before = model.config._attn_implementation
    with torch.inference_mode(False), torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation(before)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter's, optimizer's and quantizer's warnings and log lines are not the server's
    (the quantizer advises on the root logger)."""
    import logging

    logger = logging.getLogger("onnxruntime")
    level = logger.level
    root = logging.getLogger()
    advice = QuantizerAdvice()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        root.addFilter(advice)
        try:
            yield
        finally:
            root.removeFilter(advice)
            logger.setLevel(level)


class QuantizerAdvice:
    """Drops the quantizer's advice to pre-process the graph (ORT's shape inference pass, which
    matters for static quantization, not dynamic), logged on the root logger."""

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")
