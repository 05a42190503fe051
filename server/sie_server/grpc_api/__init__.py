"""The gRPC transport: servicers, error mapping, proto conversion, server assembly."""
