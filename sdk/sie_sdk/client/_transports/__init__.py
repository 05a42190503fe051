"""The SDK's two transports: gRPC to the server, HTTP (msgpack) through the bridge. Each is a
small sync class and a small async class over one shared description of the call (``base``)."""
