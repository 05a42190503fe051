"""gRPC targets from what users write: one ``host:port`` stays as it is (DNS may return several
addresses, all used), a comma-separated list of addresses becomes an ``ipv4:``/``ipv6:`` target
(names in a list are resolved once), and any gRPC target URI (``dns:///svc:50051``) passes
through. ``ROUND_ROBIN`` is the service config that spreads calls over every address with grpc's
own policy. A bad target raises ``ValueError`` with one line.
"""

from __future__ import annotations

import ipaddress
import json
import socket

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def grpc_target(backend: str) -> str:
    """A gRPC target for ``backend`` (see the module docstring)."""
    parts = [part.strip() for part in backend.split(",") if part.strip()]
    if not parts:
        raise ValueError("the gRPC target is empty")
    if len(parts) == 1:
        return parts[0]
    addresses = [_resolve(part) for part in parts]
    families = {"ipv6" if address.startswith("[") else "ipv4" for address in addresses}
    if len(families) > 1:
        raise ValueError(f"the address list mixes IPv4 and IPv6 addresses: {backend}")
    return f"{families.pop()}:{','.join(addresses)}"


def _resolve(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # a name in a list: resolve it once, at startup
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port))[0][4][0])
        except (OSError, ValueError) as exc:
            raise ValueError(f"host {host!r} does not resolve: {exc}") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
