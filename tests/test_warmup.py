"""Warm-up runs every task and output a model serves before the model is marked loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from sie_server.catalog import CatalogError
from sie_server.cli import main
from sie_server.config import Settings
from sie_server.engine.warmup import QUERY, TEXT
from sie_server.grpc_api.server import build_registry

from tests.fakes import FakeAdapter
from tests.server_utils import fake_entry, serving, write_catalog_entry

HERE = Path(__file__).parent


async def test_warm_up_encodes_as_document_and_query_and_scores(tmp_path: Path) -> None:
    entry = fake_entry(
        "fake/warm", profiles={"default": {"options": {"query_template": "q: {text}"}}}
    )
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
    entry = fake_entry("fake/encode-only", tasks=["encode"])
    write_catalog_entry(tmp_path, entry)
    async with serving([tmp_path], preload=["fake/encode-only"]) as handle:
        adapter = handle.running.registry.entry("fake/encode-only").adapter
        assert isinstance(adapter, FakeAdapter)
        assert [p.texts for p in adapter.passes] == [(TEXT,), (TEXT,)]


def test_a_profile_the_family_cannot_serve_stops_the_server_at_startup(tmp_path: Path) -> None:
    """Every profile is resolved for every task at startup, not only the default one at load."""
    entry = fake_entry(
        "fake/bad-profile",
        profiles={"default": {}, "retrieval": {"options": {"query_template": "q: {query}"}}},
    )
    path = write_catalog_entry(tmp_path, entry)
    message = f"{path}: profile 'retrieval': option 'query_template' uses placeholder {{query}}"
    with pytest.raises(CatalogError) as caught:
        build_registry(Settings(models_dir=(tmp_path,), device="cpu"))
    assert str(caught.value).startswith(message)
    with pytest.raises(SystemExit) as exited:
        main(["--models-dir", str(tmp_path), "--device", "cpu", "--port", "0"])
    assert str(exited.value).startswith(f"sie-server: bad model catalog: {message}")


def test_an_unknown_adapter_stops_the_server_at_startup(tmp_path: Path) -> None:
    entry = {**fake_entry("fake/unknown"), "adapter": "transformerz"}
    path = write_catalog_entry(tmp_path, entry)
    with pytest.raises(CatalogError, match=f"{path}: unknown adapter 'transformerz'"):
        build_registry(Settings(models_dir=(tmp_path,), device="cpu"))


def test_a_profile_value_no_task_accepts_stops_the_server(tmp_path: Path) -> None:
    cases = [
        ({"score_mode": "sparse"}, "option 'score_mode' must be one of dense"),
        ({"threshold": 0.5}, "option 'threshold' is read by no task of fake/m"),
    ]
    for options, fragment in cases:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        write_catalog_entry(folder, fake_entry("fake/m", profiles={"p": {"options": options}}))
        with pytest.raises(CatalogError) as caught:
            build_registry(Settings(models_dir=(folder,), device="cpu"))
        assert "profile 'p': " + fragment in str(caught.value)
