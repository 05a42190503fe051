"""Bridge settings: read once from flags and ``SIE_BRIDGE_*`` environment variables, then frozen.

Precedence: command-line flag > environment variable > default. Security settings (API keys, the
backend channel's TLS) are described in docs/security.md.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sie_sdk.api_keys import split_keys
from sie_sdk.logs import LOG_FORMATS
from sie_sdk.settings import Option, boolean, read_options
from sie_sdk.settings import build_parser as settings_parser
from sie_sdk.targets import grpc_target
from sie_sdk.tls import ClientTLS

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    #: The gRPC server: ``host:port``, several comma-separated addresses (spread with grpc's
    #: ``round_robin``), or any gRPC target URI (``dns:///sie.default.svc:50051``).
    backend: str = "127.0.0.1:50051"
    #: Deadline of each backend call, seconds.
    request_timeout_s: float = 60.0
    #: Largest request body accepted (413 above it).
    max_body_bytes: int = 64 * MIB
    #: Largest gRPC message sent to or received from the backend.
    max_message_bytes: int = 64 * MIB
    #: Interval of the relayed status stream (``/ws/status``), milliseconds.
    status_interval_ms: int = 200
    log_level: str = "INFO"
    #: Keys a client must present as ``Authorization: Bearer <key>`` (with ``api_keys_file``:
    #: the keys of both); none and no file: the bridge checks nothing itself (the server may).
    api_keys: tuple[str, ...] = ()
    #: One key a line (``#`` comments), re-read when it changes.
    api_keys_file: Path | None = None
    #: The key the bridge presents to the server on every call; None: it forwards the client's
    #: ``Authorization`` header instead.
    backend_api_key: str | None = None
    #: TLS on the backend channel: the CA of the server's certificate (also on with a
    #: ``grpcs://`` backend, then with the system roots) and, for mTLS, the bridge's certificate
    #: chain and key.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Observability (docs/observability.md).
    #: OpenTelemetry traces: a span per HTTP request and per backend call, exported over
    #: OTLP/gRPC, the trace id in ``X-Trace-ID``.
    tracing: bool = False
    #: The OTLP/gRPC collector; None: OpenTelemetry's OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else
    #: http://localhost:4317.
    otlp_endpoint: str | None = None
    #: The traces' ``service.name``; None: OTEL_SERVICE_NAME, else ``sie-bridge``.
    service_name: str | None = None
    #: ``text`` or ``json`` (one object a line, with the trace id inside a span).
    log_format: str = "text"
    #: No flag: an OpenTelemetry TracerProvider to use instead of building the OTLP one (tests, or
    #: an application embedding the bridge with its own OpenTelemetry setup; not shut down here).
    tracer_provider: Any = field(default=None, repr=False, compare=False)

    @property
    def backend_target(self) -> str:
        """The gRPC target of ``backend`` (a ``grpc://`` or ``grpcs://`` prefix dropped)."""
        return grpc_target(self.backend.removeprefix("grpcs://").removeprefix("grpc://"))

    @property
    def backend_tls(self) -> ClientTLS | None:
        """TLS of the backend channel; None: plaintext."""
        if (
            self.tls_ca is None
            and self.tls_cert is None
            and not self.backend.startswith("grpcs://")
        ):
            return None
        return ClientTLS(self.tls_ca, self.tls_cert, self.tls_key)


# flag name, type (or parser, like ``boolean``), help. The env var is SIE_BRIDGE_<NAME>.
_OPTIONS: tuple[Option, ...] = (
    ("host", str, "address to bind"),
    ("port", int, "HTTP port (0 picks a free one)"),
    ("backend", str, "gRPC server target: host:port, a comma-separated list, or a gRPC URI"),
    ("request-timeout-s", float, "deadline of each backend call in seconds"),
    ("max-body-bytes", int, "largest request body accepted (413 above it)"),
    ("max-message-bytes", int, "largest gRPC message to or from the backend"),
    ("status-interval-ms", int, "interval of /ws/status messages"),
    ("log-level", str, "DEBUG, INFO, WARNING, ERROR"),
    (
        "api-keys",
        str,
        "comma-separated API keys a client must present as 'Authorization: Bearer <key>' "
        "(prefer the environment or --api-keys-file: flags show in the process list)",
    ),
    ("api-keys-file", Path, "file of API keys, one a line ('#' comments), re-read on change"),
    (
        "backend-api-key",
        str,
        "key the bridge presents to the server on every call (default: forward the client's "
        "Authorization header)",
    ),
    ("tls-ca", Path, "PEM CA of the server's certificate: TLS on the backend channel"),
    ("tls-cert", Path, "PEM client certificate chain for mTLS on the backend channel"),
    ("tls-key", Path, "PEM private key of --tls-cert"),
    (
        "tracing",
        boolean,
        "OpenTelemetry tracing: a span per request and per backend call, exported over OTLP/gRPC, "
        "X-Trace-ID on responses (needs pip install 'sie[tracing]'; --tracing alone means true)",
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
        "service.name of the traces (default: OTEL_SERVICE_NAME, else sie-bridge)",
    ),
    ("log-format", str, "text, or json: one object a line, with trace_id/span_id inside a span"),
)


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        "sie-bridge",
        "SIE HTTP bridge: the REST/msgpack/JSON API on top of the gRPC server. "
        "Every flag also reads SIE_BRIDGE_<FLAG> from the environment.",
        _OPTIONS,
        "SIE_BRIDGE_",
    )


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> BridgeSettings:
    env = os.environ if environ is None else environ
    known = {f.name for f in fields(BridgeSettings)}
    values = read_options(build_parser(), argv, env, _OPTIONS, "SIE_BRIDGE_")
    assert set(values) <= known
    if "api_keys" in values:
        values["api_keys"] = split_keys(values["api_keys"])
    settings = BridgeSettings(**values)
    try:
        settings.backend_target  # noqa: B018 (validates --backend)
    except ValueError as exc:
        raise SystemExit(f"--backend: {exc}") from None
    if settings.request_timeout_s <= 0 or settings.max_body_bytes <= 0:
        raise SystemExit("--request-timeout-s and --max-body-bytes must be positive")
    if settings.log_format not in LOG_FORMATS:
        raise SystemExit(
            f"--log-format must be {' or '.join(LOG_FORMATS)}; got {settings.log_format!r}"
        )
    _check_security(settings)
    return settings


def _check_security(settings: BridgeSettings) -> None:
    """Refuse key and TLS settings that cannot work, with the flag to fix."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    for flag, path in (
        ("--api-keys-file", settings.api_keys_file),
        ("--tls-ca", settings.tls_ca),
        ("--tls-cert", settings.tls_cert),
        ("--tls-key", settings.tls_key),
    ):
        if path is not None and not path.is_file():
            raise SystemExit(f"{flag}: no such file: {path}")
