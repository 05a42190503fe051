"""Protobuf responses -> the documented HTTP response shapes (the bridge sends them; the SDK's
gRPC transport reads results from them, so both transports parse one shape).

Vectors stay in their proto bytes: each becomes a msgpack-numpy map sharing the Tensor's buffer
(``sie_sdk.wire.packed_tensor``), which the msgpack codec writes as is and the JSON codec turns
into lists. No element is touched in Python on the msgpack path.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from sie_sdk.tensors import DTYPE_NAMES
from sie_sdk.v1 import common_pb2, encode_pb2, extract_pb2, models_pb2, score_pb2, status_pb2
from sie_sdk.wire import packed_tensor

_MODEL_STATES = {
    models_pb2.MODEL_STATE_AVAILABLE: "available",
    models_pb2.MODEL_STATE_LOADING: "loading",
    models_pb2.MODEL_STATE_LOADED: "loaded",
    models_pb2.MODEL_STATE_UNLOADING: "unloading",
    models_pb2.MODEL_STATE_FAILED: "failed",
}


def timing(value: common_pb2.Timing) -> dict[str, float]:
    return {
        "total_ms": value.total_ms,
        "queue_ms": value.queue_ms,
        "tokenization_ms": value.tokenization_ms,
        "inference_ms": value.inference_ms,
        "postprocessing_ms": value.postprocessing_ms,
    }


def timing_headers(value: common_pb2.Timing) -> dict[str, str]:
    """The spec's ``X-*-Time`` headers in milliseconds (postprocessing only when > 0)."""
    headers = {
        "X-Total-Time": f"{value.total_ms:.3f}",
        "X-Queue-Time": f"{value.queue_ms:.3f}",
        "X-Tokenization-Time": f"{value.tokenization_ms:.3f}",
        "X-Inference-Time": f"{value.inference_ms:.3f}",
    }
    if value.postprocessing_ms > 0:
        headers["X-Postprocessing-Time"] = f"{value.postprocessing_ms:.3f}"
    return headers


def _dtype(tensor: common_pb2.Tensor) -> str:
    return DTYPE_NAMES.get(tensor.dtype, "float32")


def encode_result(result: encode_pb2.EncodeResult) -> dict[str, Any]:
    out: dict[str, Any] = {"id": result.id}
    if result.HasField("dense"):
        dense = result.dense
        out["dense"] = {
            "dims": dense.dims,
            "dtype": _dtype(dense.values),
            "values": packed_tensor(dense.values),
        }
    if result.HasField("sparse"):
        sparse = result.sparse
        out["sparse"] = {
            "dims": sparse.dims,
            "dtype": _dtype(sparse.values),
            "indices": packed_tensor(sparse.indices),
            "values": packed_tensor(sparse.values),
        }
    if result.HasField("multivector"):
        multi = result.multivector
        out["multivector"] = {
            "token_dims": multi.token_dims,
            "num_tokens": multi.num_tokens,
            "dtype": _dtype(multi.values),
            "values": packed_tensor(multi.values),
        }
    out["num_tokens"] = result.num_tokens
    out["truncated"] = result.truncated
    return out


def encode_response(reply: encode_pb2.EncodeResponse) -> dict[str, Any]:
    return {
        "model": reply.model,
        "items": [encode_result(result) for result in reply.items],
        "timing": timing(reply.timing),
    }


def score_response(reply: score_pb2.ScoreResponse) -> dict[str, Any]:
    return {
        "model": reply.model,
        "query_id": reply.query_id or None,
        "scores": [
            {"item_id": entry.item_id, "score": entry.score, "rank": entry.rank}
            for entry in reply.scores
        ],
        "timing": timing(reply.timing),
    }


def _struct(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def extract_result(result: extract_pb2.ExtractResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": result.id,
        "entities": [
            {
                "text": e.text,
                "label": e.label,
                "score": e.score,
                **({"start": e.start} if e.HasField("start") else {}),
                **({"end": e.end} if e.HasField("end") else {}),
                **({"bbox": list(e.bbox)} if e.bbox else {}),
            }
            for e in result.entities
        ],
        "relations": [
            {"head": r.head, "tail": r.tail, "relation": r.relation, "score": r.score}
            for r in result.relations
        ],
        "classifications": [{"label": c.label, "score": c.score} for c in result.classifications],
        "objects": [
            {"label": o.label, "score": o.score, "bbox": list(o.bbox)} for o in result.objects
        ],
    }
    if result.HasField("data"):
        out["data"] = _struct(result.data)
    return out


def extract_response(reply: extract_pb2.ExtractResponse) -> dict[str, Any]:
    return {
        "model": reply.model,
        "items": [extract_result(result) for result in reply.items],
        "timing": timing(reply.timing),
    }


def model_info(info: models_pb2.ModelInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": info.name,
        "inputs": list(info.inputs),
        "outputs": list(info.outputs),
        "tasks": list(info.tasks),
        "dims": dict(info.dims),
        "loaded": info.loaded,
        "state": _MODEL_STATES.get(info.state, "available"),
        "device": info.device or None,
        "max_sequence_length": info.max_sequence_length,
        "profiles": {
            name: {
                "is_default": profile.is_default,
                "output_types": list(profile.output_types),
                "output_similarity": dict(profile.output_similarity),
            }
            for name, profile in info.profiles.items()
        },
    }
    if info.error:
        out["error"] = info.error
    return out


def _config(config: status_pb2.ModelConfig) -> dict[str, Any]:
    return {
        "adapter": config.adapter,
        "max_sequence_length": config.max_sequence_length,
        "outputs": list(config.outputs),
        "default_profile": config.default_profile,
        "tasks": list(config.tasks),
    }


def status_message(snapshot: status_pb2.WatchStatusResponse) -> dict[str, Any]:
    """The spec's ``/ws/status`` message (the bridge relays it; the SDK's ``watch_status`` yields it). ``counters`` and ``histograms`` are keyed by metric name,
    then by model (summed over other labels), as the original SIE server sends them."""
    counters: dict[str, dict[str, int]] = {}
    for sample in snapshot.counters:
        by_model = counters.setdefault(sample.name, {})
        model = sample.labels.get("model", "")
        by_model[model] = by_model.get(model, 0) + sample.value
    histograms: dict[str, dict[str, dict[str, Any]]] = {}
    for h in snapshot.histograms:
        entry = histograms.setdefault(h.name, {}).setdefault(
            h.labels.get("model", ""),
            {"buckets": list(h.bounds), "counts": [0] * len(h.counts), "sum": 0.0, "count": 0},
        )
        if len(entry["counts"]) == len(h.counts):
            entry["counts"] = [a + b for a, b in zip(entry["counts"], h.counts, strict=True)]
            entry["sum"] += h.sum
            entry["count"] += h.count
    server = snapshot.server
    return {
        "timestamp": snapshot.timestamp,
        "gpu": snapshot.gpu,
        "loaded_models": list(snapshot.loaded_models),
        "server": {
            "version": server.version,
            "uptime_seconds": server.uptime_seconds,
            "user": server.user,
            "working_dir": server.working_dir,
            "pid": server.pid,
        },
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "gpu_type": g.gpu_type,
                "utilization_percent": g.utilization_percent,
                "memory_used_bytes": g.memory_used_bytes,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_threshold_pct": g.memory_threshold_pct,
                "temperature_c": g.temperature_c,
            }
            for g in snapshot.gpus
        ],
        "models": [
            {
                "name": m.name,
                "state": m.state,
                "device": m.device or None,
                "memory_bytes": m.memory_bytes,
                "queue_depth": m.queue_depth,
                "queue_pending_items": m.queue_pending_items,
                "config": _config(m.config),
            }
            for m in snapshot.models
        ],
        "counters": counters,
        "histograms": histograms,
    }
