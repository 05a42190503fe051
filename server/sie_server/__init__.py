"""SIE server: the gRPC inference engine (catalog, engine, adapters, servicers)."""

__version__ = "0.1.0"
