"""``sie-server`` / ``python -m sie_server``: parse settings once, configure logging, serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sie_server.config import load_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from sie_server.allocator import fix_mmap_threshold
    from sie_server.catalog import CatalogError
    from sie_server.grpc_api.server import serve

    fix_mmap_threshold(settings.malloc_mmap_threshold_kb)
    try:
        asyncio.run(serve(settings))
    except CatalogError as exc:  # a bad catalog entry: one clear line, no traceback
        raise SystemExit(f"sie-server: bad model catalog: {exc}") from None


if __name__ == "__main__":
    main()
