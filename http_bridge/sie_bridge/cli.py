"""``sie-bridge`` / ``python -m sie_bridge``: parse settings once, configure logging, serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sie_bridge.config import load_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from sie_bridge.app import serve

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
