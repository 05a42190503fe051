"""A sentence-transformers model's own description of itself, read from its files and frozen.

A model saved by sentence-transformers lists its module pipeline in ``modules.json``; each
module keeps its configuration (and weights) in its own folder. This module reads those files,
without torch, into an ``STPipeline`` that the dense adapter runs:

* exactly one ``Transformer`` first, at the model's root (``path`` ""): the backbone the HF text
  base loads. ``sentence_bert_config.json`` may ask for ``do_lower_case``.
* then one ``Pooling`` (modes concatenated in the order the config lists them; legacy
  ``pooling_mode_*`` flags in sentence-transformers' legacy order), then any number of ``Dense``,
  ``LayerNorm`` and ``Normalize`` modules on the sentence embedding, in file order. ``Dropout``
  is the identity at inference and is dropped.
* any other module (CNN, LSTM, WordEmbeddings, StaticEmbedding, Router, a custom class, ...), or
  a supported one in a position or on a feature it does not have here, fails the load with
  ``ModelLoadFailed`` naming its type and folder: a pipeline we only partly ran would give
  silently wrong vectors.
* prompts come from ``config_sentence_transformers.json`` (``prompts``, ``default_prompt_name``).

A folder without ``modules.json`` is read the way sentence-transformers loads a plain
transformers checkpoint: mean pooling, no normalization, no prompts.

``read_model_file`` (a model's JSON file, local or from the hub cache) is shared with the other
families that read sentence-transformers files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sie_server.adapters.hf import model_file
from sie_server.catalog import CatalogError
from sie_server.errors import ModelLoadFailed

#: sentence-transformers' pooling modes.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Names ``load_options.pooling`` may also use for a mode.
POOLING_ALIASES: Mapping[str, str] = {"last": "lasttoken"}
#: Legacy boolean Pooling keys, in the order sentence-transformers concatenates their modes.
LEGACY_POOLING_KEYS: Mapping[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: The feature every module after Pooling reads and writes.
SENTENCE_EMBEDDING = "sentence_embedding"
#: Prompt names a document uses, first present wins (as ``encode_document`` tries them).
DOCUMENT_PROMPTS = ("document", "passage", "corpus")


# ---- the modules ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TransformerModule:
    folder: str = ""
    do_lower_case: bool = False


@dataclass(frozen=True, slots=True)
class PoolingModule:
    folder: str
    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    #: The token embedding size the pooling expects (None: not recorded).
    embedding_dimension: int | None = None


@dataclass(frozen=True, slots=True)
class DenseModule:
    """``activation(linear(x)) [+ residual(x)]``; weights in ``folder`` (``linear.*``,
    ``residual.weight``, ``activation_function.*``)."""

    folder: str
    in_features: int
    out_features: int
    bias: bool
    #: The activation class's full name (``torch.nn.modules.activation.Tanh``).
    activation: str
    use_residual: bool = False


@dataclass(frozen=True, slots=True)
class LayerNormModule:
    folder: str
    dimension: int


@dataclass(frozen=True, slots=True)
class NormalizeModule:
    folder: str


Head = DenseModule | LayerNormModule | NormalizeModule


@dataclass(frozen=True, slots=True)
class Prompts:
    """``config_sentence_transformers.json``'s prompts. sentence-transformers saves ``""`` for
    the query and document prompts a model does not have, so an empty prompt counts as absent."""

    prompts: Mapping[str, str] = field(default_factory=dict)
    default_name: str | None = None

    def for_side(self, is_query: bool) -> str:
        """A query's ``query`` prompt, a document's ``document`` / ``passage`` / ``corpus``
        prompt, else the ``default_prompt_name`` prompt, else ``""``."""
        for name in ("query",) if is_query else DOCUMENT_PROMPTS:
            if self.prompts.get(name):
                return self.prompts[name]
        return self.prompts.get(self.default_name, "") if self.default_name else ""


@dataclass(frozen=True, slots=True)
class STPipeline:
    transformer: TransformerModule
    pooling: PoolingModule
    heads: tuple[Head, ...] = ()
    prompts: Prompts = field(default_factory=Prompts)

    def output_dims(self, hidden: int, model: str) -> int:
        """The sentence embedding size for a backbone of ``hidden`` size; ModelLoadFailed when
        a module's sizes do not chain."""
        pooling = self.pooling
        if pooling.embedding_dimension not in (None, hidden):
            raise _failed(
                model,
                f"Pooling in {pooling.folder!r} expects token embeddings of size "
                f"{pooling.embedding_dimension}, the transformer gives {hidden}",
            )
        dims = hidden * len(pooling.modes)
        for head in self.heads:
            if isinstance(head, DenseModule):
                if head.in_features != dims:
                    raise _failed(
                        model,
                        f"Dense in {head.folder!r} takes {head.in_features} features, "
                        f"its input has {dims}",
                    )
                dims = head.out_features
            elif isinstance(head, LayerNormModule) and head.dimension != dims:
                raise _failed(
                    model,
                    f"LayerNorm in {head.folder!r} has dimension {head.dimension}, "
                    f"its input has {dims}",
                )
        return dims

    def with_options(self, options: Mapping[str, Any], model: str) -> STPipeline:
        """The catalog's ``load_options`` override: ``pooling`` replaces the pooling modes,
        ``normalize`` adds a final Normalize (true) or removes every Normalize (false)."""
        pipeline = self
        modes = pooling_option(options, model)
        if modes is not None:
            pipeline = replace(pipeline, pooling=replace(pipeline.pooling, modes=modes))
        normalize = normalize_option(options, model)
        if normalize is not None:
            heads: tuple[Head, ...] = tuple(
                h for h in pipeline.heads if not isinstance(h, NormalizeModule)
            )
            if normalize:
                heads = (*heads, NormalizeModule(folder="(load_options)"))
            pipeline = replace(pipeline, heads=heads)
        return pipeline


# ---- load_options ----------------------------------------------------------------------------
def pooling_option(options: Mapping[str, Any], model: str) -> tuple[str, ...] | None:
    """``load_options.pooling``: one mode or a list of modes (CatalogError when invalid)."""
    value = options.get("pooling")
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    accepted = (*POOLING_MODES, *POOLING_ALIASES)
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n in accepted for n in names)
    ):
        raise CatalogError(
            f"{model}: load_options.pooling must be one of {', '.join(accepted)} "
            f"(or a list of them), got {value!r}"
        )
    return tuple(POOLING_ALIASES.get(n, n) for n in names)


def normalize_option(options: Mapping[str, Any], model: str) -> bool | None:
    value = options.get("normalize")
    if value is not None and not isinstance(value, bool):
        raise CatalogError(f"{model}: load_options.normalize must be true or false, got {value!r}")
    return value


# ---- reading the files -----------------------------------------------------------------------
def read_model_file(source: str, filename: str) -> Any | None:
    """A JSON file of the model (local folder or hub cache); None when it does not exist."""
    path = model_file(source, filename)
    return json.loads(path.read_text()) if path is not None else None


def read_pipeline(source: str, model: str) -> STPipeline:
    """The model's pipeline and prompts (ModelLoadFailed for what the adapter cannot run)."""
    prompts = read_prompts(source, model)
    modules = read_model_file(source, "modules.json")
    if modules is None:
        return STPipeline(TransformerModule(), PoolingModule(folder=""), prompts=prompts)
    if not isinstance(modules, list) or not all(isinstance(m, Mapping) for m in modules):
        raise _failed(model, "modules.json must be a list of modules")
    transformer: TransformerModule | None = None
    pooling: PoolingModule | None = None
    heads: list[Head] = []
    for entry in modules:
        kind, folder = _kind(entry), str(entry.get("path", ""))
        if kind == "Transformer" and transformer is None and pooling is None and folder == "":
            transformer = read_transformer(source, model)
        elif kind == "Pooling" and transformer is not None and pooling is None:
            pooling = read_pooling(source, folder, model)
        elif kind in ("Dense", "LayerNorm", "Normalize") and pooling is not None:
            heads.append(read_head(source, kind, folder, model))
        elif kind == "Dropout" and transformer is not None:
            continue  # the identity at inference
        else:
            raise _failed(
                model,
                f"cannot run sentence-transformers module {entry.get('type')!r} "
                f"in folder {folder!r} (this adapter runs a Transformer at the model's root, "
                "then one Pooling, then Dense, LayerNorm and Normalize modules)",
            )
    if transformer is None or pooling is None:
        raise _failed(model, "modules.json has no Transformer followed by a Pooling module")
    return STPipeline(transformer, pooling, tuple(heads), prompts)


def read_prompts(source: str, model: str) -> Prompts:
    config = read_model_file(source, "config_sentence_transformers.json") or {}
    kind = config.get("model_type", "SentenceTransformer")
    if kind != "SentenceTransformer":
        raise _failed(model, f"a sentence-transformers {kind} model is not a dense encoder")
    raw = config.get("prompts") or {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, str | None) for v in raw.values()):
        raise _failed(model, "config_sentence_transformers.json: prompts must map names to text")
    prompts = {str(k): v or "" for k, v in raw.items()}
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise _failed(
            model, f"default_prompt_name {default!r} is not among the prompts {sorted(prompts)}"
        )
    return Prompts(prompts, default)


def read_transformer(source: str, model: str) -> TransformerModule:
    config = read_model_file(source, "sentence_bert_config.json") or {}
    task = config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise _failed(
            model,
            f"cannot run a sentence-transformers Transformer with transformer_task {task!r} "
            "in folder '' (only feature-extraction)",
        )
    return TransformerModule(do_lower_case=bool(config.get("do_lower_case", False)))


def read_pooling(source: str, folder: str, model: str) -> PoolingModule:
    config = _module_config(source, folder, "Pooling", model)
    mode = config.get("pooling_mode")
    if mode is None:  # legacy boolean keys
        legacy = tuple(m for key, m in LEGACY_POOLING_KEYS.items() if config.get(key))
        modes = legacy or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise _failed(model, f"Pooling in {folder!r}: unknown pooling mode(s) {unknown}")
    dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    return PoolingModule(
        folder=folder,
        modes=modes,
        include_prompt=bool(config.get("include_prompt", True)),
        embedding_dimension=None if dimension is None else int(dimension),
    )


def read_head(source: str, kind: str, folder: str, model: str) -> Head:
    # Normalize has nothing to configure; older saves do not even have its folder.
    config = _module_config(source, folder, kind, model, required=kind != "Normalize")
    for key in ("module_input_name", "module_output_name"):
        feature = config.get(key)
        if feature not in (None, SENTENCE_EMBEDDING):
            raise _failed(
                model,
                f"{kind} in {folder!r} works on {feature!r}; only {SENTENCE_EMBEDDING!r} is supported",
            )
    if kind == "Normalize":
        return NormalizeModule(folder)
    try:
        if kind == "LayerNorm":
            return LayerNormModule(folder, int(config["dimension"]))
        return DenseModule(
            folder=folder,
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            # Dense's own default when its config names none.
            activation=str(config.get("activation_function", "torch.nn.modules.activation.Tanh")),
            use_residual=bool(config.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _failed(model, f"{kind} in {folder!r}: bad config.json ({exc!r})") from None


def module_weight_files(folder: str) -> Sequence[str]:
    """Where a module's weights may be, in the order sentence-transformers looks."""
    prefix = f"{folder}/" if folder else ""
    return (f"{prefix}model.safetensors", f"{prefix}pytorch_model.bin")


def _module_config(
    source: str, folder: str, kind: str, model: str, *, required: bool = True
) -> Mapping[str, Any]:
    config = read_model_file(source, f"{folder}/config.json" if folder else "config.json")
    if config is None and not required:
        return {}
    if not isinstance(config, Mapping):
        raise _failed(model, f"{kind} in {folder!r} has no config.json")
    return config


def _kind(entry: Mapping[str, Any]) -> str:
    """The class name of a module sentence-transformers ships (``sentence_transformers.models.
    Pooling``, ``sentence_transformers.sentence_transformer.modules.pooling.Pooling``, ...);
    "" for a class from any other package."""
    path = str(entry.get("type", ""))
    return path.rsplit(".", 1)[-1] if path.startswith("sentence_transformers.") else ""


def _failed(model: str, message: str) -> ModelLoadFailed:
    return ModelLoadFailed(f"{model}: {message}", model=model)
