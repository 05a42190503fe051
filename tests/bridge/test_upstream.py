"""The bridge's backend channel: ``--backend`` targets, and one channel spreading calls over
several servers with grpc's round_robin."""

from __future__ import annotations

from pathlib import Path

import pytest
from sie_sdk.targets import grpc_target as target_of

from tests.bridge_utils import bridged
from tests.fakes import FakeAdapter
from tests.server_utils import fake_entry, serving, write_catalog_entry

MODEL = "fake/rr"


@pytest.mark.parametrize(
    ("backend", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("dns:///sie.default.svc:50051", "dns:///sie.default.svc:50051"),
        ("127.0.0.1:1, 127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
        ("localhost:7,127.0.0.1:8", "ipv4:127.0.0.1:7,127.0.0.1:8"),
    ],
)
def test_backend_targets(backend: str, target: str) -> None:
    assert target_of(backend) == target


@pytest.mark.parametrize(
    ("backend", "fragment"),
    [("", "empty"), ("127.0.0.1:1,b", "not host:port"), ("127.0.0.1:1,[::1]:2", "mixes")],
)
def test_bad_backends_are_refused_with_a_line(backend: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        target_of(backend)


async def test_calls_spread_over_every_address(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    catalog = [tmp_path / "catalog"]
    async with serving(catalog, [MODEL]) as one, serving(catalog, [MODEL]) as two:
        adapters = []
        for handle in (one, two):
            adapter = handle.running.registry.entry(MODEL).adapter
            assert isinstance(adapter, FakeAdapter)
            adapters.append(adapter)
        async with bridged(f"{one.address},{two.address}") as http:
            for n in range(8):
                body = {"items": [{"text": f"call{n}"}]}
                async with http.session.post(f"/v1/encode/{MODEL}", json=body) as r:
                    assert r.status == 200
        served = [{t for t in a.seen_texts() if t.startswith("call")} for a in adapters]
        assert served[0], "the first server took calls"
        assert served[1], "the second server took calls"
        assert served[0] | served[1] == {f"call{n}" for n in range(8)}
