"""The benchmark corpus, copied into the repository (tests never read ``../shared``)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "bench-texts.json"


@cache
def corpus() -> dict[str, list[str]]:
    """``{"short": [...], "medium": [...], "long": [...]}``, 512 texts each."""
    data: dict[str, list[str]] = json.loads(CORPUS.read_text())
    return data
