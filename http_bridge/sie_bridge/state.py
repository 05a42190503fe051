"""Typed keys of what the application holds (aiohttp's ``AppKey``), shared by the routes."""

from __future__ import annotations

from aiohttp import web
from sie_sdk.metrics import Metrics

from sie_bridge.config import BridgeSettings
from sie_bridge.upstream import Upstream

UPSTREAM = web.AppKey("upstream", Upstream)
SETTINGS = web.AppKey("settings", BridgeSettings)
#: The bridge's own request metrics (``sie_bridge_*``), rendered beside the server's.
METRICS = web.AppKey("metrics", Metrics)
