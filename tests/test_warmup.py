"""Warm-up runs every task and output a model serves before the model is marked loaded."""

from __future__ import annotations

from pathlib import Path

from sie_server.engine.warmup import QUERY, TEXT

from tests.fakes import FakeAdapter
from tests.server_utils import serving, write_catalog_entry

HERE = Path(__file__).parent


async def test_warm_up_encodes_as_document_and_query_and_scores(tmp_path: Path) -> None:
    entry = {
        "name": "fake/warm",
        "adapter": "tests.fakes:FakeAdapter",
        "weights_path": str(HERE),
        "max_sequence_length": 64,
        "outputs": {"dense": {"dims": 2}},
        "profiles": {"default": {"options": {"query_template": "q: {text}"}}},
    }
    write_catalog_entry(tmp_path, entry)
    async with serving([tmp_path], preload=["fake/warm"]) as handle:
        adapter = handle.running.registry.entry("fake/warm").adapter
        assert isinstance(adapter, FakeAdapter)
        passes = [(p.texts, p.outcome) for p in adapter.passes]
    # encode as a document, encode as a query (the profile's template), then score: the query
    # and the document in passes of their own (their settings differ).
    assert passes == [
        ((TEXT,), "ok"),
        ((f"q: {TEXT}",), "ok"),
        ((f"q: {QUERY}",), "ok"),
        ((TEXT,), "ok"),
    ]


async def test_tasks_the_catalog_leaves_out_are_not_warmed_up(tmp_path: Path) -> None:
    entry = {
        "name": "fake/encode-only",
        "adapter": "tests.fakes:FakeAdapter",
        "weights_path": str(HERE),
        "max_sequence_length": 64,
        "outputs": {"dense": {"dims": 2}},
        "tasks": ["encode"],
    }
    write_catalog_entry(tmp_path, entry)
    async with serving([tmp_path], preload=["fake/encode-only"]) as handle:
        adapter = handle.running.registry.entry("fake/encode-only").adapter
        assert isinstance(adapter, FakeAdapter)
        assert [p.texts for p in adapter.passes] == [(TEXT,), (TEXT,)]


async def test_a_default_profile_the_family_cannot_serve_fails_the_load(tmp_path: Path) -> None:
    import pytest
    from sie_server.config import Settings
    from sie_server.errors import ModelLoadFailed
    from sie_server.grpc_api.server import build_registry

    entry = {
        "name": "fake/bad-profile",
        "adapter": "tests.fakes:FakeAdapter",
        "weights_path": str(HERE),
        "max_sequence_length": 64,
        "outputs": {"dense": {"dims": 2}},
        "profiles": {"default": {"options": {"query_template": "q: {query}"}}},
    }
    write_catalog_entry(tmp_path, entry)
    registry = build_registry(Settings(models_dir=(tmp_path,), device="cpu"))
    try:
        with pytest.raises(ModelLoadFailed, match=r"'query_template' uses placeholder \{query\}"):
            await registry.load("fake/bad-profile")
    finally:
        await registry.close()
