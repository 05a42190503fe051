"""TLS credentials of a gRPC channel to the server, from PEM files: used by the SDK's gRPC
transport (``grpcs://`` URLs) and the bridge's backend channel (``--tls-ca`` and friends).

Without a CA file the system's roots verify the server; a client certificate and its key (both or
neither) are presented for mTLS. The files are read when a channel is made, and a channel's
credentials cannot change: a holder that must follow rotated files compares ``stamp()`` and makes
a new channel when it changes (the bridge does); a rotated server certificate signed by the same
CA needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """Where the PEM files are: the CA that signs the server's certificate (None: the system
    roots) and, for mTLS, the client's certificate chain and private key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS client certificate needs its key, and a key its certificate")

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """(inode, size, mtime) of each file: it changes when one is replaced or rewritten."""
        stamps = []
        for path in (self.ca, self.cert, self.key):
            if path is None:
                continue
            try:
                found = path.stat()
            except OSError:
                stamps.append((0, -1, 0))
            else:
                stamps.append((found.st_ino, found.st_size, found.st_mtime_ns))
        return tuple(stamps)

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (reads the files; OSError when one cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()
