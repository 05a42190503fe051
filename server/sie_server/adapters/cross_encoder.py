"""Cross-encoder rerankers (``cross-encoder/ms-marco-*``, ``BAAI/bge-reranker-*``,
``mixedbread-ai/mxbai-rerank-*-v1``): one sequence-classification forward pass per (query, item)
pair, one logit per pair, scored exactly as sentence-transformers' ``CrossEncoder.predict``
scores it by default.

* Each pair is one payload, so pairs of different requests share forward passes (the batch key
  holds nothing request-specific: the instruction is folded into the query's tokens).
* The query is ``"{instruction} {query}"`` when the request has an instruction. Only the
  document side is cut (``truncation="only_second"``) at ``max_sequence_length``; a query that
  leaves no room for a single document token is ``InputTooLong`` (never a tokenizer error).
* ``token_type_ids`` travel in the payload's ``extra`` when the tokenizer produces them and the
  model's forward takes them (BERT); sentence-transformers feeds them the same way.
* The activation on the logit is sentence-transformers 6's default for the model: the
  ``activation_fn`` of ``config_sentence_transformers.json`` (a model saved by ST >= 5, read only
  when ``modules.json`` marks it a ``CrossEncoder``), else ``config.json``'s
  ``sentence_transformers.activation_fn`` (ST 4), else its legacy
  ``sbert_ce_default_activation_function``, else ``Sigmoid``. Like ST without
  ``trust_remote_code``, only ``torch.*`` activations are honoured; ``load_options.activation``
  (``sigmoid`` | ``identity``) overrides the files.
* A model with ``num_labels != 1`` is not a reranker: loading it is a ``CatalogError``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sie_server.adapters.base import PairScorer, require_texts
from sie_server.adapters.hf import model_file
from sie_server.adapters.hf_text import HFPairAdapter
from sie_server.adapters.st_config import read_model_file
from sie_server.catalog import CatalogError
from sie_server.domain import InputItem, LoadTarget, TokenizedText
from sie_server.errors import InvalidInput, ModelLoadFailed
from sie_server.tasks.score import ScoreSettings

log = logging.getLogger(__name__)

#: ``load_options.activation`` values and the torch modules they name.
ACTIVATIONS: Mapping[str, str] = {
    "sigmoid": "torch.nn.modules.activation.Sigmoid",
    "identity": "torch.nn.modules.linear.Identity",
}
ST_CONFIG = "config_sentence_transformers.json"


class CrossEncoderAdapter(HFPairAdapter, PairScorer[TokenizedText]):
    #: The torch module applied to the float32 logits (resolved at load).
    activation: Any = None
    #: Its dotted path, as sentence-transformers names it (``fullname``).
    activation_path: str = ""

    def check_spec(self) -> None:
        self._activation_option()

    def _activation_option(self) -> str | None:
        value = self.load_options.get("activation")
        if value is None:
            return None
        if not isinstance(value, str) or value not in ACTIVATIONS:
            raise CatalogError(
                f"{self.spec.name}: load_options.activation must be one of "
                f"{', '.join(ACTIVATIONS)}, got {value!r}"
            )
        return ACTIVATIONS[value]

    def after_load(self, target: LoadTarget) -> None:
        super().after_load(target)
        config = self.model.config
        num_labels = int(config.num_labels)
        if num_labels != 1:
            self.unload()
            raise CatalogError(
                f"{self.spec.name}: a cross-encoder reranker needs one output logit, but the "
                f"model has num_labels={num_labels} ({', '.join(map(str, config.label2id))}); "
                "serve a classifier with another adapter"
            )
        st_config = cross_encoder_save(target.source)
        if st_config is not None:
            self._check_modules(target.source)
        path = self._activation_option() or saved_activation(
            target.source, st_config, config.to_dict()
        )
        self.activation_path = path or ACTIVATIONS["sigmoid"]
        activation = load_activation(self.activation_path, self.spec.name)
        self.activation = activation.to(target.device)

    def _check_modules(self, source: str) -> None:
        """A sentence-transformers CrossEncoder save must be a bare sequence classifier (one
        module): extra modules (a Dense head, a LogitScore) change the scores."""
        modules = read_model_file(source, "modules.json")
        if isinstance(modules, list) and len(modules) > 1:
            kinds = ", ".join(str(m.get("type", "?")) for m in modules if isinstance(m, Mapping))
            self.unload()
            raise CatalogError(
                f"{self.spec.name}: modules.json lists {len(modules)} modules ({kinds}); the "
                "cross_encoder adapter serves a single sequence-classification model"
            )

    def unload(self) -> None:
        super().unload()
        self.activation = None

    # ---- hooks ------------------------------------------------------------------------------
    def prepare_pairs(
        self, query: InputItem, items: Sequence[InputItem], settings: ScoreSettings
    ) -> list[TokenizedText]:
        name = self.spec.name
        docs = require_texts(items, name)
        if query.images or query.text is None:
            raise InvalidInput(f"the query needs text: model {name} accepts text only", model=name)
        text = f"{settings.instruction} {query.text}" if settings.instruction else query.text
        self.check_fixed_side(text, what="query")
        return self.tokenize_pairs([text] * len(docs), docs, truncation="only_second")

    def collate_pairs(self, payloads: Sequence[TokenizedText], settings: ScoreSettings) -> Any:
        return self.pad_pairs(payloads)

    def run_pairs(self, inputs: Any, settings: ScoreSettings) -> list[float]:
        logits = self.model(**inputs).logits.float()  # ST upcasts half logits before activating
        scores = self.activation(logits).squeeze(-1)
        return [float(s) for s in scores.cpu().tolist()]


# ---- the activation sentence-transformers picks -------------------------------------------------
def cross_encoder_save(source: str) -> Mapping[str, Any] | None:
    """``config_sentence_transformers.json`` when sentence-transformers loads the folder as a
    saved CrossEncoder (``modules.json`` present, ``model_type`` CrossEncoder), else None: like
    ST, a save of another model type is converted and its settings are not read."""
    if model_file(source, "modules.json") is None:
        return None
    st_config = read_model_file(source, ST_CONFIG)
    if not isinstance(st_config, Mapping):
        return None
    model_type = st_config.get("model_type", "SentenceTransformer")
    return st_config if model_type == "CrossEncoder" else None


def saved_activation(
    source: str, st_config: Mapping[str, Any] | None, config: Mapping[str, Any]
) -> str | None:
    """The trusted (``torch.*``) activation path the model's files name, where
    sentence-transformers 6.2 looks for one, in its order: the CrossEncoder save's config, then
    ``config.json``; None means its default (Sigmoid for one label)."""
    if st_config is not None:
        path = trusted(st_config.get("activation_fn"), source)
        if path is not None:
            return path
    section = config.get("sentence_transformers")
    if isinstance(section, Mapping) and "activation_fn" in section:
        return trusted(section["activation_fn"], source)
    return trusted(config.get("sbert_ce_default_activation_function"), source)


def trusted(path: Any, source: str) -> str | None:
    if path is None:
        return None
    if isinstance(path, str) and path.startswith("torch."):
        return path
    # sentence-transformers logs the same and falls back to its default without trust_remote_code.
    log.warning("%s: activation %r is not a torch module; using the default", source, path)
    return None


def load_activation(path: str, model: str) -> Any:
    """Instantiate the torch module at a dotted path (``torch.nn.modules.linear.Identity``)."""
    import torch

    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadFailed(
            f"{model}: activation {path!r} cannot be imported: {exc}", model=model
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelLoadFailed(f"{model}: activation {path!r} is not a torch module", model=model)
    return cls()
