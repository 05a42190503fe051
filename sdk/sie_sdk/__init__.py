"""SIE SDK: ``SIEClient`` and ``SIEAsyncClient`` over gRPC or HTTP, the reference's types
(``sie_sdk.types``), errors (``sie_sdk.client.errors``) and client-side scoring
(``sie_sdk.scoring``); the generated gRPC stubs live in ``sie_sdk.v1``.
"""

__version__ = "0.1.0"

from sie_sdk.client import SIEAsyncClient, SIEClient
from sie_sdk.types import Item

__all__ = ["Item", "SIEAsyncClient", "SIEClient", "__version__"]
