"""SIE SDK: the generated gRPC stubs (``sie_sdk.v1``) and wire helpers (``sie_sdk.tensors``).

The high-level clients (``SIEClient``, ``SIEAsyncClient``) arrive with the SDK issue.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
