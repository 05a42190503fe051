"""A tiny random ColBERT v2 checkpoint saved the way stanford ColBERT's ``HF_ColBERT`` saves one
(``config.json``, the BERT WordPiece tokenizer, ``model.safetensors`` holding ``bert.*`` and a
bias-free ``linear.weight``), and colbert-ai 0.2.22 itself as the reference.

The reference is ``colbert.modeling.checkpoint.Checkpoint`` with a ``ColBERTConfig`` carrying
``dim``, ``query_maxlen``, ``doc_maxlen`` and ``mask_punctuation=True``: its ``QueryTokenizer`` /
``DocTokenizer`` (marker tokens, ``[MASK]`` query augmentation, truncation), its forward pass
(``linear``, punctuation mask, L2 normalization) and its ``colbert_score`` (MaxSim). Three things
are adjusted around it, all while loading, none in what it computes:

* colbert-ai 0.2.22 cannot load any checkpoint under transformers 5.16 as shipped:
  ``HF_ColBERT.__init__`` calls ``init_weights()`` but not ``post_init()``, which transformers 5
  needs to set ``all_tied_weights_keys``, so ``Checkpoint(folder, config)`` fails in
  ``from_pretrained`` with ``AttributeError: 'HF_ColBERT' object has no attribute
  'all_tied_weights_keys'. Did you mean: '_tied_weights_keys'?``. While loading,
  ``colbert.modeling.base_colbert.class_factory`` is wrapped so that the class it returns calls
  ``post_init()`` after its own ``__init__``; weights then load unchanged (``linear.weight`` and
  every ``bert.*`` tensor equal the file's).
* On a machine without a GPU, ``ColBERT.__init__`` JIT-compiles the ``segmented_maxsim_cpp``
  C++ extension with ninja (it works here, about 45 s the first time on these 2 shared cores,
  then cached under ``~/.cache/torch_extensions``). Only ``colbert_score_packed`` uses it, not
  the padded ``colbert_score`` used here, so loading marks the extension as loaded instead.
* colbert-ai picks CUDA with fp16 autocast whenever a GPU is visible; the reference is pinned
  to CPU float32 (model on CPU, ``use_gpu`` off, mixed precision off) so it compares at 1e-5 on
  any machine. The deprecation warnings colbert-ai triggers while importing and loading
  (``torch.jit.script`` from transformers' DeBERTa-v2 module, ``torch.cuda.amp`` on CPU) are
  ignored, by exact message, inside those calls only.

pylate (the other ColBERT library) is not installed: it pins sentence-transformers==5.3.0 and
transformers<=5.3, which conflicts with this project's pins.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_models.bert import minilm_tokenizer, tiny_bert_config

HIDDEN = 32
DIM = 16
QUERY_MARKER = "[unused0]"
DOC_MARKER = "[unused1]"

#: (message start, category) of the warnings colbert-ai triggers on CPU while importing/loading.
COLBERT_AI_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("`torch.jit.script` is deprecated", DeprecationWarning),
    ("`torch.cuda.amp.GradScaler(args...)` is deprecated", FutureWarning),
    ("torch.cuda.amp.GradScaler is enabled, but CUDA is not available", UserWarning),
)


def build_tiny_colbert(folder: Path) -> Path:
    """Write config, tokenizer and ``model.safetensors`` (``bert.*`` + ``linear.weight``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = minilm_tokenizer()
    config = tiny_bert_config(tokenizer, HIDDEN, max_position_embeddings=128)
    torch.manual_seed(0)

    class HFColBERT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)  # type: ignore[no-untyped-call]
            self.linear = torch.nn.Linear(HIDDEN, DIM, bias=False)

    model = HFColBERT().eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextmanager
def colbert_ai_warnings_ignored() -> Iterator[None]:
    with warnings.catch_warnings():
        for message, category in COLBERT_AI_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        yield


@contextmanager
def _loadable_under_transformers_5() -> Iterator[None]:
    """The two loading adjustments (see the module docstring), undone on exit."""
    from colbert.modeling import base_colbert  # type: ignore[import-untyped]
    from colbert.modeling.colbert import ColBERT  # type: ignore[import-untyped]

    original = base_colbert.class_factory

    def class_factory(name_or_path: str) -> Any:
        hf_colbert = original(name_or_path)

        class PostInitHFColBERT(hf_colbert):  # type: ignore[misc, valid-type]
            def __init__(self, config: Any, colbert_config: Any) -> None:
                super().__init__(config, colbert_config)
                self.post_init()

        return PostInitHFColBERT

    had_extension = hasattr(ColBERT, "loaded_extensions")
    base_colbert.class_factory = class_factory
    ColBERT.loaded_extensions = True
    try:
        yield
    finally:
        base_colbert.class_factory = original
        if not had_extension:
            del ColBERT.loaded_extensions


def colbert_ai_config(folder: Path, *, query_maxlen: int, doc_maxlen: int) -> Any:
    with colbert_ai_warnings_ignored():
        from colbert.infra import ColBERTConfig  # type: ignore[import-untyped]

    return ColBERTConfig(
        checkpoint=str(folder),
        dim=DIM,
        query_maxlen=query_maxlen,
        doc_maxlen=doc_maxlen,
        mask_punctuation=True,
        query_token_id=QUERY_MARKER,
        doc_token_id=DOC_MARKER,
    )


def load_colbert_ai(folder: Path, *, query_maxlen: int, doc_maxlen: int) -> Any:
    """colbert-ai's ``Checkpoint`` on the folder, on CPU in float32."""
    config = colbert_ai_config(folder, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)
    with colbert_ai_warnings_ignored():
        from colbert.modeling.checkpoint import Checkpoint  # type: ignore[import-untyped]
        from colbert.utils.amp import MixedPrecisionManager  # type: ignore[import-untyped]

        with _loadable_under_transformers_5():
            checkpoint = Checkpoint(str(folder), colbert_config=config, verbose=0)
    checkpoint.model.to("cpu")
    checkpoint.use_gpu = False
    checkpoint.amp_manager = MixedPrecisionManager(False)
    return checkpoint


def reference_colbert(
    folder: Path,
    texts: Sequence[str],
    *,
    is_query: bool,
    query_maxlen: int,
    doc_maxlen: int,
    checkpoint: Any = None,
) -> list[np.ndarray]:
    """colbert-ai's Q (``queryFromText``: ``query_maxlen`` rows, ``[MASK]`` rows included) or D
    (``docFromText(keep_dims=False)``: punctuation rows dropped) per text, float32."""
    ck = checkpoint
    if ck is None:
        ck = load_colbert_ai(folder, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)
    if is_query:
        queries = ck.queryFromText(list(texts), to_cpu=True)
        return [np.asarray(q.float().numpy(), dtype=np.float32) for q in queries]
    docs = ck.docFromText(list(texts), keep_dims=False)
    return [np.asarray(d.float().numpy(), dtype=np.float32) for d in docs]


def reference_maxsim(checkpoint: Any, query: str, docs: Sequence[str]) -> list[float]:
    """colbert-ai's ``colbert_score`` of one query against each doc: for each query row, the
    best dot product with a doc row that is not padding or punctuation, summed."""
    from colbert.modeling.colbert import colbert_score

    q = checkpoint.queryFromText([query], to_cpu=True)
    ids, mask = checkpoint.doc_tokenizer.tensorize(list(docs))
    d, d_mask = checkpoint.doc(ids, mask, keep_dims="return_mask", to_cpu=True)
    scores = colbert_score(q, d.cpu(), d_mask.cpu(), config=checkpoint.colbert_config)
    return [float(s) for s in scores.tolist()]
