"""API keys as the server and the bridge check them: one ``ApiKeys`` per process.

The valid keys are the fixed ones (``SIE_API_KEYS`` / ``SIE_BRIDGE_API_KEYS``, comma separated)
plus those of a key file (one key per line; blank lines and lines starting with ``#`` are
skipped). The file is re-read when it changes: at most once per ``reload_interval_s`` a check
looks at its size, modification time and inode (one ``stat``), and reads it only when one of them
moved, so a replaced file (written in place or renamed over) takes effect within the interval
without a restart. A file that cannot be read or parsed on a later check keeps the last keys (and
says so in the log): a rotation that goes wrong must not lock every client out, nor let every
client in.

Checking is on when any key or a file was configured; a configured file with no keys in it
refuses every call (never "auth off"). A presented key is compared with every configured key, in
constant time and without stopping at the first match (``hmac.compare_digest`` over SHA-256
digests, so neither the position of a match nor the keys' lengths show in the timing).

This module lives in ``sie_sdk`` because both the server and the bridge use it, and the bridge
depends on ``sie_sdk``, never on ``sie_server``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
#: The scheme of ``Authorization: Bearer <key>`` (RFC 6750), compared case-insensitively.
BEARER = "bearer"
RELOAD_INTERVAL_S = 1.0


def split_keys(value: str) -> tuple[str, ...]:
    """The keys of a comma-separated list (an environment variable), blanks dropped."""
    return tuple(key.strip() for key in value.split(",") if key.strip())


def parse_key_file(text: str) -> tuple[str, ...]:
    """The keys of a key file: one a line, stripped; blank lines and ``#`` comment lines skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` value; None for anything else."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        return None
    return token


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The keys a process accepts; ``allows`` checks one (reloading the file when it is due)."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        file: Path | None = None,
        *,
        reload_interval_s: float = RELOAD_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fixed = tuple(_digest(key.strip()) for key in keys if key.strip())
        self._file = file
        self._reload_interval_s = reload_interval_s
        self._clock = clock
        self._from_file: tuple[bytes, ...] = ()
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = clock()
        if file is not None:
            self._from_file = self._read(file)  # at startup a missing file is an error
            self._signature = _signature(os.stat(file))
            if not self._fixed and not self._from_file:
                log.warning("the API key file %s holds no key: every call is refused", file)

    @property
    def enabled(self) -> bool:
        """Whether calls need a key (keys or a key file were configured)."""
        return bool(self._fixed) or self._file is not None

    def allows(self, key: str | None) -> bool:
        """Whether ``key`` is one of the configured keys (always True when checking is off)."""
        if not self.enabled:
            return True
        self._reload_if_due()
        if key is None:
            return False
        presented = _digest(key)
        match = False
        for known in (*self._fixed, *self._from_file):
            # Every key is compared, even after a match: no early exit to time.
            match |= hmac.compare_digest(presented, known)
        return match

    def allows_header(self, authorization: str | None) -> bool:
        """``allows`` for an ``Authorization`` header (or gRPC metadata) value."""
        return self.allows(bearer_token(authorization))

    def _reload_if_due(self) -> None:
        if self._file is None:
            return
        now = self._clock()
        if now - self._checked_at < self._reload_interval_s:
            return
        self._checked_at = now
        try:
            signature = _signature(os.stat(self._file))
            if signature == self._signature:
                return
            keys = self._read(self._file)
        except (OSError, UnicodeDecodeError) as exc:
            log.warning(
                "cannot re-read the API key file %s, keeping its last keys: %s", self._file, exc
            )
            return
        self._signature = signature
        self._from_file = keys
        log.info("API key file %s reloaded: %d keys", self._file, len(keys))

    @staticmethod
    def _read(file: Path) -> tuple[bytes, ...]:
        return tuple(_digest(key) for key in parse_key_file(file.read_text(encoding="utf-8")))


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)
