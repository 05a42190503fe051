"""SIE HTTP bridge: the documented REST/msgpack/JSON API and /ws/status on top of gRPC.

The routes arrive with the HTTP bridge issue; the package is here so the import name and the
dependency direction (sie_bridge -> sie_sdk, never sie_server) are fixed from the start.
"""

__version__ = "0.1.0"
