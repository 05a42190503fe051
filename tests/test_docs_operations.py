"""The runbook (docs/operations.md) names every setting of both processes, with its environment
variable, and every metric series they export: a new flag or series without a line there fails."""

from __future__ import annotations

from pathlib import Path

from sie_bridge.config import _OPTIONS as BRIDGE_OPTIONS
from sie_sdk.prometheus import HELP
from sie_server.config import _OPTIONS as SERVER_OPTIONS

RUNBOOK = (Path(__file__).resolve().parents[1] / "docs/operations.md").read_text()


def _rows(options: tuple[tuple[str, object, str], ...], prefix: str) -> list[str]:
    return [
        f"| `--{name}` | `{prefix}{name.upper().replace('-', '_')}` |" for name, _, _ in options
    ]


def test_every_server_and_bridge_setting_has_a_row() -> None:
    rows = _rows(SERVER_OPTIONS, "SIE_") + _rows(BRIDGE_OPTIONS, "SIE_BRIDGE_")
    missing = [row for row in rows if row not in RUNBOOK]
    assert missing == []


def test_every_exported_metric_series_is_explained() -> None:
    missing = [name for name in HELP if f"`{name}" not in RUNBOOK]
    assert missing == []
