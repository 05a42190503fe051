"""Protobuf messages <-> the HTTP API's request and response shapes, shared by the bridge and the
SDK so that both transports carry exactly the same thing: ``to_proto`` (request bodies) and
``from_proto`` (responses, with vectors as msgpack-numpy maps sharing the proto's bytes)."""
