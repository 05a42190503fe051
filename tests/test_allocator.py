"""The server's malloc tuning (``sie_server.allocator``): applied on glibc, skipped when asked
not to or when the environment sets the threshold itself (glibc's own variable wins)."""

from __future__ import annotations

import platform

import pytest
from sie_server.allocator import fix_mmap_threshold

glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt's M_MMAP_THRESHOLD is glibc's"
)


@glibc
def test_the_threshold_is_set_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_mmap_threshold(128) is True


def test_zero_leaves_glibcs_default() -> None:
    assert fix_mmap_threshold(0) is False


def test_the_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold(128) is False


@glibc
def test_trim_hands_free_heap_pages_back() -> None:
    from sie_server.allocator import trim

    # Many small blocks (heap, not mmap) freed at once leave free pages behind to return.
    blocks = [bytearray(4096) for _ in range(20_000)]
    del blocks
    assert trim() is True
