"""Content negotiation: request bodies in, responses out.

Request bodies are msgpack when ``Content-Type`` says so, else JSON. Responses are msgpack unless
``Accept`` prefers JSON (``sie_sdk.wire.wants_json``). Every response carries
``X-SIE-Server-Version``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web
from sie_sdk.reasons import ErrorDetail
from sie_sdk.wire import (
    JSON,
    MSGPACK,
    dump_json,
    is_msgpack,
    load_json,
    pack_msgpack,
    unpack_msgpack,
    wants_json,
)

from sie_bridge import __version__
from sie_bridge.errors import BridgeError, invalid_input


def _server_version() -> str:
    try:
        return version("sie")
    except PackageNotFoundError:
        return __version__


SERVER_VERSION = _server_version()
VERSION_HEADER = "X-SIE-Server-Version"


async def read_body(request: web.Request) -> Any:
    """The decoded body (413 above the size limit, 400 when empty or malformed)."""
    raw = await request.read()
    if not raw:
        raise invalid_input("request body is empty")
    if is_msgpack(request.content_type):
        return unpack_msgpack(raw)
    return load_json(raw)


def reply(
    request: web.Request, payload: Any, headers: dict[str, str] | None = None
) -> web.Response:
    """``payload`` as msgpack or JSON, as the client's ``Accept`` asks."""
    if wants_json(request.headers.get("Accept")):
        try:
            body = dump_json(payload)
        except ValueError:  # NaN or infinity: JSON has neither
            raise BridgeError(
                ErrorDetail(
                    "INFERENCE_ERROR",
                    "the result holds NaN or infinity, which JSON cannot carry; "
                    "ask for msgpack (Accept: application/msgpack) to receive it as computed",
                )
            ) from None
        return web.Response(body=body, content_type=JSON, headers=headers)
    return web.Response(body=pack_msgpack(payload), content_type=MSGPACK, headers=headers)


def json_reply(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=dump_json(payload), content_type=JSON, status=status)
