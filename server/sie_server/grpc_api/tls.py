"""TLS and mTLS on the gRPC port, with certificates reloaded when their files change.

``server_credentials`` gives grpc's dynamic SSL credentials: grpc asks ``CertificateFiles.fetch``
before every new connection's handshake. It compares the size, modification time and inode of the
certificate, key and client-CA files with those of the configuration in use (three ``stat`` calls)
and reads the files only when one moved, so a renewed certificate (cert-manager, certbot, a
Kubernetes secret update) is served to every new connection without a restart; connections
already open keep theirs. A new pair that does not load (a key that is not the certificate's, a
half-written file) is refused with a warning in the log and the last good configuration stays in
use; the next connection looks again.

With ``--tls-client-ca`` every client must present a certificate signed by that CA (mTLS).
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]


@dataclass(slots=True)
class CertificateFiles:
    """The server's PEM files, and the signature of those last loaded."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    _signature: Signature = field(default=(), init=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The configuration of the files as they are now (``ValueError`` when they do not
        load: unreadable, not PEM, or a key that is not the certificate's)."""
        signature = self._stat()
        _check(self.cert, self.key, self.client_ca)
        config = grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
        )
        self._signature = signature
        return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate fetcher: a new configuration when the files changed, else None
        (keep the current one). Never raises: a failure would end the handshake."""
        try:
            if self._stat() == self._signature:
                return None
            config = self.load()
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but do not load, keeping the last ones: %s", exc)
            return None
        log.info("TLS certificate reloaded from %s", self.cert)
        return config

    def _stat(self) -> Signature:
        paths = (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())
        return tuple(_signature(os.stat(path)) for path in paths)


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _check(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the files the way OpenSSL will, so a bad pair is caught before grpc gets it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
    except ssl.SSLError as exc:
        raise ValueError(f"{cert} / {key}: {exc}") from None


def _no_password() -> bytes:
    """An encrypted key fails to load (grpc cannot use one) instead of prompting on a tty."""
    return b""


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Dynamic SSL credentials serving ``files``, reloaded when they change (loads them now:
    ``ValueError`` or ``OSError`` when they do not load)."""
    # grpc-stubs types the fetcher without the None that grpc documents for "no change".
    return grpc.dynamic_ssl_server_credentials(
        files.load(),
        files.fetch,  # type: ignore[arg-type]
        require_client_authentication=files.mutual,
    )
