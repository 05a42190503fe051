"""Logging setup shared by the server and the bridge: plain text (the default) or JSON lines.

``configure_logging(level, log_format)`` is called once, by each service's cli, before anything
logs. ``--log-format json`` writes one JSON object per line to stderr::

    {"time": "2026-01-02T03:04:05.678+00:00", "level": "INFO", "logger": "sie_server.engine.registry",
     "message": "loaded ...", "trace_id": "4bf92f35...", "span_id": "00f067aa..."}

* ``time``: when the record was made, ISO 8601 in UTC with milliseconds.
* ``level``, ``logger``, ``message``: the record's level name, logger name and formatted message.
* ``trace_id`` (32 hex digits) and ``span_id`` (16): only while an OpenTelemetry span is current
  (tracing on, inside a traced request); the same ids the trace backend shows.
* ``exception`` / ``stack``: the formatted traceback, only when the record carries one.

Nothing here imports OpenTelemetry: the ids are read only if the process has imported its API
(it does when tracing is on; with tracing off no span can be current).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

#: The values of ``--log-format``.
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current OpenTelemetry span; None without one."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = current_trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def log_handler(log_format: str) -> logging.Handler:
    """A stderr handler writing ``log_format`` (one of ``LOG_FORMATS``)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be {' or '.join(LOG_FORMATS)}; got {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger at ``level``, writing ``log_format`` to stderr (call once, at startup)."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)])
