"""``sie-server`` / ``python -m sie_server``: parse settings once, configure logging, serve."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sie_sdk.logs import configure_logging

from sie_server.config import load_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
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
