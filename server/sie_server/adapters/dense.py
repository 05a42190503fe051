"""Dense sentence encoders (MiniLM, e5, bge, gte, ...): the sentence-transformers pipeline a
model ships, run on our tokenizer and transformer.

The pipeline (``st_config.STPipeline``) is read from the model's own files before loading:
Pooling (every sentence-transformers mode, several concatenated, ``include_prompt``), then
Dense, LayerNorm and Normalize modules in file order. A module the adapter cannot run fails the
load (``ModelLoadFailed``); the catalog's ``outputs.dense.dims`` must equal the pipeline's output
size (``CatalogError`` otherwise). ``load_options.pooling`` (a mode or a list) and
``load_options.normalize`` override the files.

Prompts: a query gets the model's ``query`` prompt, a document its ``document`` / ``passage`` /
``corpus`` prompt, else either gets the ``default_prompt_name`` prompt. A catalog template for the
item's side (``query_template`` / ``document_template``) or an instruction replaces the model's
prompt. The prompt is prepended to the text, as sentence-transformers does, and its token count
(special tokens before it included, a trailing special token not) travels in each payload's
``extra``: with ``include_prompt: false`` those leading tokens are left out of the pooling, per
item, so items with and without a prompt may share a batch.

Engines: ``torch`` (default), ``onnx`` or ``onnx-int8`` (``LoadTarget.engine``): with either onnx
engine the transformer is exported once (int8: and quantized) and run by ONNX Runtime
(``onnx_engine``), the torch backbone is dropped after the export, and pooling, heads and
normalization run in the same torch code as with torch.

LoRA: ``options.lora_id`` selects a peft adapter on the transformer per batch (``adapters/lora.py``;
torch engine only).

Invariant: padding is on the right, so every item's tokens start at position 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from sie_server.adapters import onnx_engine
from sie_server.adapters.hf import model_file, torch_dtype
from sie_server.adapters.hf_text import HFTextEncoder
from sie_server.adapters.lora import LORA_KEYS, LoraSupport
from sie_server.adapters.onnx_engine import OnnxEncoder
from sie_server.adapters.st_config import (
    DenseModule,
    Head,
    LayerNormModule,
    PoolingModule,
    STPipeline,
    TransformerModule,
    module_weight_files,
    normalize_option,
    pooling_option,
    read_pipeline,
)
from sie_server.catalog import CatalogError
from sie_server.domain import EncodeOutput, InputItem, LoadTarget, TokenizedText
from sie_server.errors import InternalError, ModelLoadFailed
from sie_server.tasks.encode import TEMPLATE_KEYS, EncodeSettings, format_text

if TYPE_CHECKING:
    import torch

ACTIVATION_MODULE = "torch.nn.modules.activation"


class DenseEncoderAdapter(LoraSupport, HFTextEncoder):
    output_types = frozenset({"dense"})
    encode_options = TEMPLATE_KEYS | LORA_KEYS
    #: The forward-pass engines this family runs (``LoadTarget.engine``).
    engines: ClassVar[frozenset[str]] = frozenset({"torch", *onnx_engine.ONNX_ENGINES})
    #: The ONNX Runtime transformer when the engine is onnx (the torch model is then None).
    onnx: OnnxEncoder | None = None
    pipeline: STPipeline = STPipeline(TransformerModule(), PoolingModule(folder=""))
    #: One torch module per pipeline head (None for Normalize), in order.
    head_modules: tuple[Any, ...] = ()
    #: Token count of each of the model's prompts.
    prompt_tokens: Mapping[str, int] = MappingProxyType({})

    def check_spec(self) -> None:
        super().check_spec()
        pooling_option(self.load_options, self.spec.name)
        normalize_option(self.load_options, self.spec.name)

    def load(self, target: LoadTarget) -> None:
        name = self.spec.name
        self.pipeline = read_pipeline(target.source, name).with_options(self.load_options, name)
        if target.engine in onnx_engine.ONNX_ENGINES:
            onnx_engine.require(target, name)  # before any weights load
        super().load(target)
        if target.engine in onnx_engine.ONNX_ENGINES:
            self.onnx = OnnxEncoder.open(self.model, target, name)
            self.model = None

    def after_load(self, target: LoadTarget) -> None:
        name = self.spec.name
        dims = self.pipeline.output_dims(int(self.model.config.hidden_size), name)
        dense = self.spec.outputs.get("dense")
        if dense is not None and dense.dims != dims:
            raise CatalogError(
                f"{name}: outputs.dense.dims is {dense.dims}, the model's sentence-transformers "
                f"pipeline gives {dims}"
            )
        if self.pipeline.transformer.do_lower_case:
            lowercase(self.tokenizer, name)
        self.head_modules = tuple(load_head(target, head, name) for head in self.pipeline.heads)
        prompts = {p for p in self.pipeline.prompts.prompts.values() if p}
        self.prompt_tokens = MappingProxyType({p: self.count_prompt(p) for p in prompts})

    def modules(self) -> list[Any]:
        return [self.model, *(m for m in self.head_modules if m is not None)]

    def unload(self) -> None:
        super().unload()
        self.head_modules = ()
        self.onnx = None

    def memory_bytes(self) -> int:
        return super().memory_bytes() + (self.onnx.weight_bytes if self.onnx else 0)

    def lora_unavailable(self) -> str | None:
        if self.onnx is not None:
            return "it runs on the onnx engine (LoRA adapters need the torch engine)"
        return super().lora_unavailable()

    # ---- prompts ----------------------------------------------------------------------------
    def count_prompt(self, prompt: str) -> int:
        """The prompt's tokens as sentence-transformers counts them: tokenized alone, less a
        trailing special token (so a leading [CLS] counts, the closing [SEP] does not)."""
        (tokens,) = self.tokenize([prompt])
        ids = tokens.input_ids
        special = set(self.tokenizer.all_special_ids)
        return len(ids) - 1 if ids and ids[-1] in special else len(ids)

    def model_prompt(self, settings: EncodeSettings) -> str:
        """The model's prompt for this side, unless a catalog template or an instruction
        formats the text instead."""
        template = "query_template" if settings.is_query else "document_template"
        if settings.instruction or settings.options.get(template):
            return ""
        return self.pipeline.prompts.for_side(settings.is_query)

    # ---- hooks ------------------------------------------------------------------------------
    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[TokenizedText]:
        texts = self.item_texts(items)
        prompt = self.model_prompt(settings)
        payloads = self.tokenize([prompt + format_text(text, settings) for text in texts])
        count = self.prompt_tokens.get(prompt, 0)
        for payload in payloads:
            payload.extra = count
        return payloads

    def collate_encode(self, payloads: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        import torch

        ids, mask = self.pad(payloads)
        prompt = torch.tensor([int(p.extra or 0) for p in payloads], device=self.device)
        return ids, mask, prompt

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        ids, mask, prompt = inputs
        if self.onnx is not None:
            hidden = self.onnx(ids, mask)
        else:
            with self.lora_active(settings.options):
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        vectors = pool(hidden, mask, prompt, self.pipeline.pooling)
        for head, module in zip(self.pipeline.heads, self.head_modules, strict=True):
            vectors = apply_head(head, module, vectors)
        rows = vectors.float().cpu().numpy()
        return [EncodeOutput(dense=np.ascontiguousarray(row)) for row in rows]


# ---- pooling ---------------------------------------------------------------------------------------
def pool(
    hidden: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, pooling: PoolingModule
) -> torch.Tensor:
    """[batch, seq, dim] hidden states to [batch, dim * modes], each mode as
    sentence-transformers' Pooling computes it, concatenated in the configured order. Without
    ``include_prompt`` the first ``prompt[i]`` tokens of item i are masked out."""
    import torch

    if not pooling.include_prompt:
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        mask = mask * (positions >= prompt.unsqueeze(1)).to(mask.dtype)
    half = hidden.dtype in (torch.float16, torch.bfloat16)
    accumulate = torch.float32 if half else hidden.dtype
    return torch.cat([pool_mode(mode, hidden, mask, accumulate) for mode in pooling.modes], dim=-1)


def pool_mode(
    mode: str, hidden: torch.Tensor, mask: torch.Tensor, accumulate: torch.dtype
) -> torch.Tensor:
    import torch

    if mode == "cls":  # the first token the mask keeps
        first = mask.to(torch.int).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if mode == "max":
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return hidden.masked_fill(keep == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        total = (hidden * keep).sum(dim=1, dtype=accumulate)
        count = torch.clamp(keep.sum(dim=1, dtype=accumulate), min=1e-9)
        return (total / (count if mode == "mean" else torch.sqrt(count))).to(hidden.dtype)
    if mode == "weightedmean":  # position weights 1..seq (right padding: no offset)
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=accumulate)
        weights = mask.unsqueeze(-1).to(accumulate) * positions.view(1, -1, 1)
        total = (hidden * weights).sum(dim=1)
        return (total / torch.clamp(weights.sum(dim=1), min=1e-9)).to(hidden.dtype)
    if mode == "lasttoken":  # the last token the mask keeps (a zero vector when none)
        seq = hidden.shape[1]
        found, from_end = mask.flip(1).max(dim=1)
        from_end = torch.where(found == 0, seq - 1, from_end)
        kept = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return kept[torch.arange(hidden.shape[0], device=hidden.device), seq - 1 - from_end]
    raise InternalError(f"unknown pooling mode {mode!r}")  # read_pipeline admits none


# ---- heads after pooling ---------------------------------------------------------------------
def apply_head(head: Head, module: Any, x: torch.Tensor) -> torch.Tensor:
    import torch

    if isinstance(head, DenseModule):
        out: torch.Tensor = module.activation_function(module.linear(x))
        if head.use_residual:
            out = out + (x if head.in_features == head.out_features else module.residual(x))
        return out
    if isinstance(head, LayerNormModule):
        return module.norm(x)  # type: ignore[no-any-return]
    return torch.nn.functional.normalize(x, p=2, dim=-1)


def load_head(target: LoadTarget, head: Head, model: str) -> Any:
    """The torch module of a Dense or LayerNorm head, laid out as sentence-transformers saves
    it (so its state dict loads strictly), on the target's device and dtype; None for
    Normalize."""
    import torch

    if isinstance(head, DenseModule):
        parts: dict[str, torch.nn.Module] = {
            "linear": torch.nn.Linear(head.in_features, head.out_features, bias=head.bias),
            "activation_function": activation(head, model),
        }
        if head.use_residual and head.in_features != head.out_features:
            parts["residual"] = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    elif isinstance(head, LayerNormModule):
        parts = {"norm": torch.nn.LayerNorm(head.dimension)}
    else:
        return None
    module = torch.nn.ModuleDict(parts)
    kind = type(head).__name__.removesuffix("Module")
    try:
        module.load_state_dict(module_state(target.source, head.folder, kind, model))
    except RuntimeError as exc:
        raise ModelLoadFailed(
            f"{model}: the weights of {kind} in {head.folder!r} do not fit its config: {exc}",
            model=model,
        ) from None
    return module.to(device=target.device, dtype=torch_dtype(target.dtype)).eval()


def module_state(source: str, folder: str, kind: str, model: str) -> dict[str, Any]:
    """A module folder's weights: model.safetensors, else pytorch_model.bin."""
    import torch

    for filename in module_weight_files(folder):
        path = model_file(source, filename)
        if path is None:
            continue
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        return dict(torch.load(str(path), map_location="cpu", weights_only=True))
    raise ModelLoadFailed(
        f"{model}: {kind} in {folder!r} has no weights (model.safetensors or pytorch_model.bin)",
        model=model,
    )


def activation(head: DenseModule, model: str) -> torch.nn.Module:
    """The activation a Dense config names: a torch.nn activation class, or Identity."""
    import importlib

    import torch

    module_name, _, class_name = head.activation.rpartition(".")
    found: Any = None
    if head.activation.startswith("torch."):
        try:
            found = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            found = None
    if not (
        isinstance(found, type)
        and issubclass(found, torch.nn.Module)
        and (found.__module__ == ACTIVATION_MODULE or found is torch.nn.Identity)
    ):
        raise ModelLoadFailed(
            f"{model}: Dense in {head.folder!r} names activation function {head.activation!r}, "
            f"which is not a torch.nn activation class ({ACTIVATION_MODULE}.* or Identity)",
            model=model,
        )
    try:
        return found()
    except TypeError as exc:
        raise ModelLoadFailed(
            f"{model}: Dense in {head.folder!r}: activation {head.activation!r} needs "
            f"arguments: {exc}",
            model=model,
        ) from None


# ---- tokenizer -------------------------------------------------------------------------------------
def lowercase(tokenizer: Any, model: str) -> None:
    """``do_lower_case``: put a Lowercase first in the fast tokenizer's normalizer, as
    sentence-transformers' Transformer does (unless one is there already)."""
    from tokenizers import normalizers

    if not tokenizer.is_fast:
        raise ModelLoadFailed(f"{model}: do_lower_case needs a fast tokenizer", model=model)
    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    # A Sequence iterates over its parts at run time (the stubs do not say so).
    parts = (
        list(cast("Iterable[Any]", current))
        if isinstance(current, normalizers.Sequence)
        else [current]
    )
    if not any(isinstance(part, normalizers.Lowercase) for part in parts):
        rest = [part for part in parts if part is not None]
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
