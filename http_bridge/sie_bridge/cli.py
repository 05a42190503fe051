"""``sie-bridge`` / ``python -m sie_bridge``: parse settings once, configure logging, serve."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sie_sdk.logs import configure_logging

from sie_bridge.config import load_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    from sie_bridge.app import serve

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
