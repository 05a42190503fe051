"""Bridge settings: read once from flags and ``SIE_BRIDGE_*`` environment variables, then frozen.

Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sie_sdk.targets import grpc_target

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


# flag name, type, help. The env var is SIE_BRIDGE_<NAME>.
_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("host", str, "address to bind"),
    ("port", int, "HTTP port (0 picks a free one)"),
    ("backend", str, "gRPC server target: host:port, a comma-separated list, or a gRPC URI"),
    ("request-timeout-s", float, "deadline of each backend call in seconds"),
    ("max-body-bytes", int, "largest request body accepted (413 above it)"),
    ("max-message-bytes", int, "largest gRPC message to or from the backend"),
    ("status-interval-ms", int, "interval of /ws/status messages"),
    ("log-level", str, "DEBUG, INFO, WARNING, ERROR"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sie-bridge",
        description="SIE HTTP bridge: the REST/msgpack/JSON API on top of the gRPC server. "
        "Every flag also reads SIE_BRIDGE_<FLAG> from the environment.",
    )
    for name, kind, help_text in _OPTIONS:
        env = "SIE_BRIDGE_" + name.upper().replace("-", "_")
        parser.add_argument(f"--{name}", type=kind, help=f"{help_text} [{env}]")
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> BridgeSettings:
    args = vars(build_parser().parse_args(argv))
    env = os.environ if environ is None else environ
    known = {f.name for f in fields(BridgeSettings)}
    values: dict[str, Any] = {}
    for name, kind, _ in _OPTIONS:
        attr = name.replace("-", "_")
        env_name = "SIE_BRIDGE_" + attr.upper()
        if args.get(attr) is not None:
            values[attr] = args[attr]
        elif env_name in env:
            try:
                values[attr] = kind(env[env_name])
            except ValueError:
                raise SystemExit(
                    f"{env_name}={env[env_name]!r} is not a valid {kind.__name__}"
                ) from None
    assert set(values) <= known
    settings = BridgeSettings(**values)
    try:
        grpc_target(settings.backend)
    except ValueError as exc:
        raise SystemExit(f"--backend: {exc}") from None
    if settings.request_timeout_s <= 0 or settings.max_body_bytes <= 0:
        raise SystemExit("--request-timeout-s and --max-body-bytes must be positive")
    return settings
