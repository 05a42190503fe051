"""The SDK's clients: ``SIEClient`` (blocking) and ``SIEAsyncClient`` (asyncio), one core
(``_core``) and two transports (``_transports``: gRPC and HTTP); exceptions in ``errors``."""

from sie_sdk.client.async_ import SIEAsyncClient
from sie_sdk.client.sync import SIEClient

__all__ = ["SIEAsyncClient", "SIEClient"]
