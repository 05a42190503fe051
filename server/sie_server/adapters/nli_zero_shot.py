"""NLI zero-shot classification (``MoritzLaurer/deberta-v3-base-zeroshot-v2.0`` and other
sequence classifiers trained on NLI), computing exactly what transformers'
``zero-shot-classification`` pipeline computes.

* One payload per (item, label): premise = the item's text, hypothesis =
  ``hypothesis_template.format(label)`` (default ``"This example is {}."``, the pipeline's),
  tokenized as the pipeline does: a pair, only the premise cut (``truncation="only_first"``) at
  ``max_sequence_length``. A hypothesis that leaves no room for one premise token is
  ``InputTooLong``. Payloads are item-major: item i's labels are rows ``i*L .. i*L+L-1``.
* The forward pass does not depend on the request (template and ``multi_label`` are used in
  prepare and postprocess only), so every request shares one batch key: pairs of requests with
  different label sets share forward passes.
* Scores, from each pair's logits (float32): the entailment column is the first label of
  ``config.label2id`` starting with "entail" (case-insensitive). With ``multi_label`` or a single
  label, each label scores ``softmax([contradiction, entailment])[entailment]``, where, as in the
  pipeline, the "contradiction" column is the LAST column when entailment is column 0 and column 0
  otherwise (whatever label2id calls it: ``not_entailment`` for two-way models). Else the
  entailment logits are soft-maxed across the item's labels.
* A model without an entailment label, or with fewer than two labels, fails to load
  (``CatalogError`` naming its labels).
"""

from __future__ import annotations

import string
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from sie_server.adapters.base import Extractor, require_texts
from sie_server.adapters.hf_text import HFPairAdapter
from sie_server.catalog import CatalogError
from sie_server.domain import F32, InputItem, LoadTarget, TokenizedText
from sie_server.errors import InvalidInput
from sie_server.tasks.extract import (
    Classification,
    ExtractedItem,
    ExtractSettings,
    ExtractSupport,
)
from sie_server.tasks.options import Options, check_template

#: The pipeline's default hypothesis template.
DEFAULT_TEMPLATE = "This example is {}."


class NLIZeroShotAdapter(HFPairAdapter, Extractor[TokenizedText]):
    extract_support = ExtractSupport(labels=True, labels_required=True, output_schema=False)
    extract_options = frozenset({"hypothesis_template", "multi_label"})
    entailment_id: int = 0
    #: The column soft-maxed against entailment for multi_label (negative: from the end).
    contradiction_id: int = 0

    def after_load(self, target: LoadTarget) -> None:
        super().after_load(target)
        config = self.model.config
        label2id = {str(k): int(v) for k, v in config.label2id.items()}
        labels = ", ".join(label2id) or "none"
        entailment = next((i for k, i in label2id.items() if k.lower().startswith("entail")), None)
        if entailment is None or int(config.num_labels) < 2:
            self.unload()
            raise CatalogError(
                f"{self.spec.name}: an NLI zero-shot model needs an 'entailment' label among two "
                f"or more; its label2id has {labels}"
            )
        self.entailment_id = entailment
        self.contradiction_id = -1 if entailment == 0 else 0

    def extract_key(self, settings: ExtractSettings) -> Hashable:
        return ("nli",)

    # ---- options --------------------------------------------------------------------------------
    def _template(self, settings: ExtractSettings) -> str:
        name = self.spec.name
        template = Options(settings.options, name).text("hypothesis_template", DEFAULT_TEMPLATE)
        check_template(template, frozenset({""}), key="hypothesis_template", model=name)
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if fields != [""]:
            raise InvalidInput(
                f"option 'hypothesis_template' must contain {{}} exactly once, where the label "
                f"goes; got {template!r}",
                model=name,
            )
        return template

    def _multi_label(self, settings: ExtractSettings) -> bool:
        return Options(settings.options, self.spec.name).flag("multi_label", False)

    # ---- hooks ------------------------------------------------------------------------------
    def prepare_extract(
        self, items: Sequence[InputItem], settings: ExtractSettings
    ) -> list[TokenizedText]:
        name = self.spec.name
        texts = require_texts(items, name)
        template = self._template(settings)
        self._multi_label(settings)  # refuse a bad value before any forward pass
        hypotheses = [template.format(label) for label in settings.labels]
        for label, hypothesis in zip(settings.labels, hypotheses, strict=True):
            self.check_fixed_side(hypothesis, what=f"hypothesis of label {label!r}")
        return self.tokenize_pairs(
            [text for text in texts for _ in hypotheses],
            [hypothesis for _ in texts for hypothesis in hypotheses],
            truncation="only_first",
        )

    def collate_extract(self, payloads: Sequence[TokenizedText], settings: ExtractSettings) -> Any:
        return self.pad_pairs(payloads)

    def run_extract(self, inputs: Any, settings: ExtractSettings) -> list[F32]:
        logits = self.model(**inputs).logits.detach().float().cpu().numpy()
        return [np.ascontiguousarray(row, dtype=np.float32) for row in logits]

    def postprocess_extract(
        self,
        items: Sequence[InputItem],
        payloads: Sequence[TokenizedText],
        outputs: Sequence[Any],
        settings: ExtractSettings,
    ) -> list[ExtractedItem]:
        labels = settings.labels
        logits = np.stack(outputs).astype(np.float32).reshape(len(items), len(labels), -1)
        if self._multi_label(settings) or len(labels) == 1:
            pair = logits[..., [self.contradiction_id, self.entailment_id]]
            scores = softmax(pair)[..., 1]
        else:
            scores = softmax(logits[..., self.entailment_id])
        results: list[ExtractedItem] = []
        for row in scores:
            order = sorted(range(len(labels)), key=lambda j: -float(row[j]))
            results.append(
                ExtractedItem(
                    classifications=[Classification(labels[j], float(row[j])) for j in order]
                )
            )
        return results


def softmax(x: F32) -> F32:
    """Softmax over the last axis (shifted by the max: same values, no overflow)."""
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    out: F32 = shifted / shifted.sum(axis=-1, keepdims=True)
    return out
