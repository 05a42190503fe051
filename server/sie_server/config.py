"""Server settings: read once from flags and ``SIE_*`` environment variables, then frozen.

Precedence: command-line flag > environment variable > default. Nothing else in the server reads
the environment (the HF libraries still honour their own variables such as HF_HUB_OFFLINE).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sie_sdk.logs import LOG_FORMATS
from sie_sdk.settings import Option, boolean, read_options
from sie_sdk.settings import build_parser as settings_parser

from sie_server.catalog import BUILTIN_CATALOG_DIR
from sie_server.domain import ENGINES, MAX_BATCH_WAIT_MS
from sie_server.engine.memory import GAUGES
from sie_server.tasks.common import RequestLimits

MIB = 1024 * 1024
#: ``--model-threads``: auto (shared on the CPU, per-model on a GPU), shared, per-model.
MODEL_THREADS = ("auto", "shared", "per-model")


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50051
    #: Catalog folders (one YAML per model); the built-in catalog when empty.
    models_dir: tuple[Path, ...] = ()
    #: Models loaded (and warmed up) before the server reports SERVING.
    preload: tuple[str, ...] = ()
    #: The catalog models this server serves (empty: all of them).
    models: tuple[str, ...] = ()
    #: Bound on memory in use (0: none); past it, least recently used models are evicted.
    memory_budget_mb: int = 0
    #: What the budget bounds: process (CUDA allocated / RSS) or weights (loaded parameters).
    memory_gauge: str = "process"
    device: str = "auto"
    dtype: str = "auto"
    #: The forward-pass engine of every model whose family supports it (auto: the catalog's).
    engine: str = "auto"
    #: Which thread runs the forward passes: auto (shared on the CPU, per-model on a GPU),
    #: shared (one for every model) or per-model (engine/model_thread.py says why).
    model_threads: str = "auto"
    #: Workers of the shared compute lane (0: auto, two where torch has two threads, the
    #: layout measured; else one); under load they split the cores (engine/compute_lane.py).
    compute_workers: int = 0
    # Batching and admission.
    #: 0: by device (device.default_batch_tokens: 2048 on CPU, 16384 on GPU).
    max_batch_tokens: int = 0
    max_batch_items: int = 64
    max_batch_padding: float = 0.10
    #: Batches a request's last pending item may be passed over for (-1: never forced).
    max_batch_skips: int = -1
    batch_wait_ms: float = 0.0
    max_pending_tokens: int = 262144
    max_pending_items: int = 8192
    max_preparing_requests: int = 64
    #: Items per batch of streamed (bulk) work while interactive requests are about.
    bulk_batch_items: int = 2
    #: How long an idle model holds bulk work after an interactive batch, for its callers.
    bulk_grace_ms: float = 5.0
    #: The longest that grace holds bulk work since it last ran.
    bulk_hold_max_ms: float = 50.0
    max_items_per_request: int = 1024
    max_text_chars: int = 1_000_000
    max_labels: int = 256
    max_images_per_item: int = 8
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 40_000_000
    tokenizer_workers: int = 2
    #: A lone request of one text up to this many characters is tokenized and finished on the
    #: event loop, not handed to the pools (registry.py, ``ModelRegistry._run``); 0: never.
    inline_max_chars: int = 1000
    #: Threads decoding and preprocessing images (their own pool: image work never holds up the
    #: tokenizers of text models).
    image_workers: int = 1
    #: Seconds a failed load (of a model or a LoRA adapter) is answered MODEL_LOAD_FAILED before
    #: a request loads it again.
    load_retry_s: float = 30.0
    #: LoRA adapters kept loaded per model; past it the least recently used is evicted.
    max_loras_per_model: int = 4
    #: glibc's mmap threshold, fixed at startup (0: glibc's dynamic default; see allocator.py).
    malloc_mmap_threshold_kb: int = 0
    #: How often (at most) a model thread returns the heap's free pages after a batch (0: never).
    malloc_trim_interval_s: float = 10.0
    # Transport.
    max_message_bytes: int = 64 * MIB
    keepalive_time_ms: int = 30000
    keepalive_timeout_ms: int = 10000
    #: Close client connections after this long (0: never), so that clients re-resolve and new
    #: replicas get traffic; calls in flight get ``grace_period_s`` to finish.
    max_connection_age_s: float = 0.0
    #: Port of the Prometheus ``GET /metrics`` endpoint on ``host``; None: no endpoint, 0: a
    #: free port.
    metrics_port: int | None = None
    #: Also serve gRPC on this Unix domain socket (a bridge or client on the same host, without
    #: a TCP port); None: the port only. Plaintext, so not with TLS.
    uds: Path | None = None
    # Lifecycle.
    drain_delay_s: float = 1.0
    grace_period_s: float = 30.0
    #: Health reports NOT_SERVING while one compute job has run longer than this (0: never).
    stuck_compute_s: float = 300.0
    #: After a malformed message in a request stream, its further messages are read and dropped
    #: until the client half-closes, is quiet this long, or the limit passes (0: not read);
    #: grpc aio clients still writing when the status lands see INTERNAL (grpc/grpc#36066).
    stream_drain_idle_s: float = 1.0
    stream_drain_limit_s: float = 30.0
    status_interval_ms: int = 200
    log_level: str = "INFO"
    # Security (docs/security.md).
    #: Keys a call must present as ``authorization: Bearer <key>`` (with ``api_keys_file``: the
    #: keys of both); none and no file: no checking.
    api_keys: tuple[str, ...] = ()
    #: One key a line (``#`` comments), re-read when it changes.
    api_keys_file: Path | None = None
    #: The server's certificate chain and key (PEM): TLS on the gRPC port when set, reloaded when
    #: the files change.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The CA that signs client certificates: with it, every client must present one (mTLS).
    tls_client_ca: Path | None = None
    # Observability (docs/observability.md).
    #: OpenTelemetry traces: a span per RPC and per batch, exported over OTLP/gRPC.
    tracing: bool = False
    #: The OTLP/gRPC collector; None: OpenTelemetry's OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else
    #: http://localhost:4317.
    otlp_endpoint: str | None = None
    #: The traces' ``service.name``; None: OTEL_SERVICE_NAME, else ``sie-server``.
    service_name: str | None = None
    #: ``text`` or ``json`` (one object a line, with the trace id inside a span).
    log_format: str = "text"
    #: No flag: an OpenTelemetry TracerProvider to use instead of building the OTLP one (tests, or
    #: an application embedding the server with its own OpenTelemetry setup; not shut down here).
    tracer_provider: Any = field(default=None, repr=False, compare=False)
    catalog_dirs: tuple[Path, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "catalog_dirs", self.models_dir or (BUILTIN_CATALOG_DIR,))

    def request_limits(self) -> RequestLimits:
        """What one request may hold, for the validators and the image decoder."""
        return RequestLimits(
            max_items=self.max_items_per_request,
            max_text_chars=self.max_text_chars,
            max_labels=self.max_labels,
            max_images_per_item=self.max_images_per_item,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
        )


# flag name, type (or parser, like ``boolean``), help. The env var is SIE_<NAME>; list-valued ones
# are comma separated.
_OPTIONS: tuple[Option, ...] = (
    ("host", str, "address to bind"),
    ("port", int, "gRPC port (0 picks a free one)"),
    (
        "models-dir",
        Path,
        "catalog folder of model YAMLs (repeatable; default: the built-in catalog)",
    ),
    ("preload", str, "model to load before serving (repeatable)"),
    (
        "models",
        str,
        "serve only these catalog models (repeatable; default: every catalogued model may load)",
    ),
    (
        "memory-budget-mb",
        int,
        "memory the loaded models may use before the least recently used is evicted (0: no bound)",
    ),
    (
        "memory-gauge",
        str,
        "what --memory-budget-mb bounds: process (CUDA allocated bytes, or RSS on CPU) or "
        "weights (the loaded models' parameters)",
    ),
    ("device", str, "auto (cuda with bf16/fp16 when present, else cpu fp32), cpu, cuda, cuda:N"),
    ("dtype", str, "auto, float32, bfloat16, float16"),
    (
        "engine",
        str,
        "auto (each catalog entry's engine), torch, onnx (ONNX Runtime, CPU float32) or "
        "onnx-int8 (the same graph with int8 weights: faster, vectors within cosine ~0.98 of "
        "torch), for every model whose family supports it; needs pip install 'sie[onnx]'",
    ),
    (
        "model-threads",
        str,
        "auto (one compute thread for every model on cpu, one per model on cuda), shared or "
        "per-model",
    ),
    (
        "compute-workers",
        int,
        "workers of the shared compute lane (cpu): under load two batches run side by side, "
        "each on half the cores, a lone batch on all of them; 0: auto (2 where torch has 2 "
        "threads, the layout measured; else 1), 1: one batch at a time",
    ),
    (
        "max-batch-tokens",
        int,
        "token budget of one batch, padded (longest x count); 0: by device (2048 on cpu, "
        "16384 on cuda)",
    ),
    ("max-batch-items", int, "items in one batch at most"),
    (
        "max-batch-padding",
        float,
        "largest share of a batch's padded tokens that may be padding (1 = no cap)",
    ),
    (
        "max-batch-skips",
        int,
        "batches a request's last pending item may be passed over for (lengths unlike its own) "
        "before it rides in the next one whatever its padding: a shorter tail for more padding; "
        "0 = arrival order within the token budget, -1 = never forced",
    ),
    (
        "batch-wait-ms",
        float,
        "under load, how long an idle model waits for the last batch's callers (0 = never)",
    ),
    ("max-pending-tokens", int, "admitted tokens per model before QUEUE_FULL"),
    ("max-pending-items", int, "admitted items per model before QUEUE_FULL"),
    ("max-preparing-requests", int, "requests per model tokenized at once before QUEUE_FULL"),
    (
        "bulk-batch-items",
        int,
        "items per batch of streamed (EncodeStream) work while interactive requests arrived in "
        "the last second, so that they wait for a short batch at most",
    ),
    (
        "bulk-grace-ms",
        float,
        "while interactive requests are about, how long an idle model holds streamed work after "
        "a batch with interactive items ends, for those callers' next requests (0 = never)",
    ),
    (
        "bulk-hold-max-ms",
        float,
        "the longest that --bulk-grace-ms holds streamed work since it last ran, so that "
        "back-to-back interactive calls cannot starve a stream",
    ),
    ("max-items-per-request", int, "items in one request at most"),
    ("max-text-chars", int, "characters of one text at most (INVALID_INPUT past it)"),
    ("max-labels", int, "labels of one extract request at most (INVALID_INPUT past it)"),
    ("max-images-per-item", int, "images of one item at most (INVALID_INPUT past it)"),
    ("max-image-bytes", int, "encoded bytes of one image at most (INVALID_INPUT past it)"),
    (
        "max-image-pixels",
        int,
        "decoded pixels (width x height) of one image at most, checked from the header before "
        "decoding (INVALID_INPUT past it)",
    ),
    ("tokenizer-workers", int, "threads tokenizing requests"),
    (
        "inline-max-chars",
        int,
        "an encode request of one text up to this many characters, arriving while no other "
        "request is in the server, is tokenized and finished on the event loop instead of in "
        "the tokenizer pool, which saves two thread handoffs (0 = always the pool)",
    ),
    ("image-workers", int, "threads decoding and preprocessing images"),
    (
        "load-retry-s",
        float,
        "seconds a model (or LoRA adapter) whose load failed answers MODEL_LOAD_FAILED before a "
        "request retries it",
    ),
    (
        "max-loras-per-model",
        int,
        "LoRA adapters kept loaded per model (at least 1); past it the least recently used one "
        "no request is using is evicted",
    ),
    (
        "malloc-mmap-threshold-kb",
        int,
        "fix glibc's mmap threshold: allocations from this size up are mapped and unmapped "
        "every time (0: glibc's dynamic default; slower, see docs/reliability.md)",
    ),
    (
        "malloc-trim-interval-s",
        float,
        "after a batch, at most this often, hand the heap's free pages back to the system, "
        "which keeps RSS flat under varying batches (0 = never)",
    ),
    ("max-message-bytes", int, "largest gRPC message sent or received"),
    ("keepalive-time-ms", int, "gRPC keepalive ping interval"),
    ("keepalive-timeout-ms", int, "gRPC keepalive ping timeout"),
    (
        "max-connection-age-s",
        float,
        "close client connections after this many seconds so clients re-resolve and spread to "
        "new replicas (0 = never)",
    ),
    (
        "metrics-port",
        int,
        "port of the Prometheus GET /metrics endpoint (0 picks a free one; default: none)",
    ),
    (
        "uds",
        Path,
        "also serve gRPC on this Unix domain socket, for a bridge or client on the same host "
        "(reach it as unix:///PATH); plaintext, so not with --tls-cert",
    ),
    ("drain-delay-s", float, "on SIGTERM: seconds NOT_SERVING before refusing new calls"),
    ("grace-period-s", float, "on SIGTERM: seconds in-flight calls get to finish"),
    (
        "stuck-compute-s",
        float,
        "health reports NOT_SERVING while one forward pass (or warm-up, LoRA attach) has run "
        "longer than this, and SERVING again when it returns; the job is logged (0 = never)",
    ),
    (
        "stream-drain-idle-s",
        float,
        "after a malformed message in a request stream: seconds a quiet client is waited for "
        "before the stream ends with INVALID_ARGUMENT",
    ),
    (
        "stream-drain-limit-s",
        float,
        "after a malformed message in a request stream: seconds at most that the client's "
        "further messages are read and dropped before the stream ends (0 = none)",
    ),
    ("status-interval-ms", int, "default interval of the status stream"),
    ("log-level", str, "DEBUG, INFO, WARNING, ERROR"),
    (
        "api-keys",
        str,
        "API key a call must present as 'authorization: Bearer <key>' (repeatable; prefer the "
        "environment or --api-keys-file: flags show in the process list)",
    ),
    (
        "api-keys-file",
        Path,
        "file of API keys, one a line ('#' comments), re-read within a second of a change",
    ),
    ("tls-cert", Path, "PEM certificate chain: TLS on the gRPC port (reloaded when it changes)"),
    ("tls-key", Path, "PEM private key of --tls-cert"),
    ("tls-client-ca", Path, "PEM CA of client certificates: clients must present one (mTLS)"),
    (
        "tracing",
        boolean,
        "OpenTelemetry tracing: a span per RPC and per batch, exported over OTLP/gRPC (needs "
        "pip install 'sie[tracing]'; --tracing alone means true)",
    ),
    (
        "otlp-endpoint",
        str,
        "OTLP/gRPC collector of the traces, e.g. http://otel-collector:4317 (default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317)",
    ),
    (
        "service-name",
        str,
        "service.name of the traces (default: OTEL_SERVICE_NAME, else sie-server)",
    ),
    ("log-format", str, "text, or json: one object a line, with trace_id/span_id inside a span"),
)
_REPEATABLE = {"models-dir", "preload", "models", "api-keys"}


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        "sie-server",
        "SIE gRPC inference server. Every flag also reads SIE_<FLAG> from the environment.",
        _OPTIONS,
        "SIE_",
        _REPEATABLE,
    )


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    known = {f.name for f in fields(Settings) if f.init}
    values = read_options(build_parser(), argv, env, _OPTIONS, "SIE_", _REPEATABLE)
    assert set(values) <= set(known)
    engine = values.get("engine", "auto")
    if engine not in ("auto", *ENGINES):
        raise SystemExit(f"--engine must be auto, {', '.join(ENGINES)}; got {engine!r}")
    model_threads = values.get("model_threads", "auto")
    if model_threads not in MODEL_THREADS:
        raise SystemExit(
            f"--model-threads must be {', '.join(MODEL_THREADS)}; got {model_threads!r}"
        )
    if values.get("compute_workers", 0) < 0:
        raise SystemExit(
            f"--compute-workers must be 0 (auto) or more; got {values['compute_workers']}"
        )
    gauge = values.get("memory_gauge", "process")
    if gauge not in GAUGES:
        raise SystemExit(f"--memory-gauge must be {' or '.join(GAUGES)}; got {gauge!r}")
    log_format = values.get("log_format", "text")
    if log_format not in LOG_FORMATS:
        raise SystemExit(f"--log-format must be {' or '.join(LOG_FORMATS)}; got {log_format!r}")
    settings = Settings(**values)
    if settings.max_batch_tokens < 0:
        raise SystemExit(
            f"--max-batch-tokens must be 0 (by device) or positive; got {settings.max_batch_tokens}"
        )
    if settings.max_batch_skips < -1:
        raise SystemExit(
            "--max-batch-skips must be -1 (never forced), 0 or positive; got "
            f"{settings.max_batch_skips}"
        )
    if not 0 <= settings.batch_wait_ms <= MAX_BATCH_WAIT_MS:
        raise SystemExit(
            f"--batch-wait-ms must be from 0 (off) to {MAX_BATCH_WAIT_MS}; got "
            f"{settings.batch_wait_ms}"
        )
    if settings.inline_max_chars < 0:
        raise SystemExit(
            f"--inline-max-chars must be 0 (never) or positive; got {settings.inline_max_chars}"
        )
    if settings.stuck_compute_s < 0:
        raise SystemExit(
            f"--stuck-compute-s must be 0 (never) or positive; got {settings.stuck_compute_s}"
        )
    if settings.stream_drain_idle_s <= 0:
        raise SystemExit(
            f"--stream-drain-idle-s must be positive; got {settings.stream_drain_idle_s}"
        )
    if settings.stream_drain_limit_s < 0:
        raise SystemExit(
            "--stream-drain-limit-s must be 0 (no drain) or positive; got "
            f"{settings.stream_drain_limit_s}"
        )
    if settings.max_loras_per_model < 1:
        raise SystemExit(
            f"--max-loras-per-model must be at least 1; got {settings.max_loras_per_model}"
        )
    _check_security(settings)
    return settings


def _check_security(settings: Settings) -> None:
    """Refuse TLS and key settings that cannot work, with the flag to fix."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SystemExit("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    if settings.uds is not None and settings.tls_cert is not None:
        raise SystemExit(
            "--uds serves plaintext, which would bypass --tls-cert's TLS (and mTLS): "
            "use one of them"
        )
    for flag, path in (
        ("--api-keys-file", settings.api_keys_file),
        ("--tls-cert", settings.tls_cert),
        ("--tls-key", settings.tls_key),
        ("--tls-client-ca", settings.tls_client_ca),
    ):
        if path is not None and not path.is_file():
            raise SystemExit(f"{flag}: no such file: {path}")
