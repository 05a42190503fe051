"""TLS and mTLS on the gRPC port, with certificates made in the test (``trustme``): a client with
the CA connects, one without it (plaintext, or another CA) fails cleanly with UNAVAILABLE; under
mTLS a client without a certificate fails; replacing the files serves the new certificate to new
connections, and a pair that does not load keeps the old one. The SDK (``grpcs://…?tls_ca=``)
and the bridge (``--tls-ca``, ``--tls-cert``/``--tls-key``) connect through it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk import SIEAsyncClient
from sie_sdk.client._transports.grpc import parse_target
from sie_sdk.client.errors import SIEConnectionError
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.grpc_api.tls import CertificateFiles

from tests.bridge_utils import JSON_HEADERS, assert_serves_fake, bridged
from tests.server_utils import HANG_GUARD_S, ServerHandle, fake_entry, serving, write_catalog_entry

FAKE = "fake/tls"
HOSTS = ("127.0.0.1", "localhost")
ENCODE = encode_pb2.EncodeRequest(model=FAKE, items=[common_pb2.Item(text="hello")])


@dataclass(frozen=True)
class Pki:
    """PEM files in a folder: a CA, a server pair it signed, a client pair another CA signed."""

    ca: Path
    cert: Path
    key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


def issue(ca: trustme.CA, folder: Path, name: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*HOSTS)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(folder / "client-ca.pem"))
    cert, key = issue(server_ca, folder, "server")
    client_cert, client_key = issue(client_ca, folder, "client")
    return Pki(folder / "ca.pem", cert, key, folder / "client-ca.pem", client_cert, client_key)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls") / "catalog"
    write_catalog_entry(folder, fake_entry(FAKE))
    return folder


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def tls_serving(catalog: Path, pki: Pki, *, mutual: bool = False) -> Any:
    """A server on TLS (mTLS when ``mutual``) with the fake model loaded."""
    return serving(
        [catalog],
        [FAKE],
        tls_cert=pki.cert,
        tls_key=pki.key,
        tls_client_ca=pki.client_ca if mutual else None,
    )


def secure_channel(
    server: ServerHandle, ca: Path | None, client: tuple[Path, Path] | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(server.address, credentials)


async def health(channel: grpc.aio.Channel) -> int:
    """The overall health status over ``channel`` (raises the call's error)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HANG_GUARD_S)
    return int(reply.status)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of a call that must fail on ``channel``."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health(channel)
    code = caught.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


SERVING = health_pb2.HealthCheckResponse.SERVING


# ---- TLS -----------------------------------------------------------------------------------------


async def test_tls_with_the_ca_works_and_without_it_fails_cleanly(
    catalog: Path, pki: Pki, other_ca: Path
) -> None:
    async with tls_serving(catalog, pki) as server:
        async with secure_channel(server, pki.ca) as channel:
            assert await health(channel) == SERVING
            reply = await encode_pb2_grpc.EncodeServiceStub(channel).Encode(
                ENCODE, timeout=HANG_GUARD_S
            )
            assert reply.items[0].dense.values.shape == [2]
        assert await refused(grpc.aio.insecure_channel(server.address)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert await refused(secure_channel(server, other_ca)) == grpc.StatusCode.UNAVAILABLE
        assert await refused(secure_channel(server, None)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_needs_a_client_certificate_from_the_client_ca(
    catalog: Path, pki: Pki, other_ca: Path
) -> None:
    async with tls_serving(catalog, pki, mutual=True) as server:
        client = (pki.client_cert, pki.client_key)
        async with secure_channel(server, pki.ca, client) as channel:
            assert await health(channel) == SERVING
        assert await refused(secure_channel(server, pki.ca)) == grpc.StatusCode.UNAVAILABLE
        # A certificate the client CA did not sign (the server's own, from the server CA).
        stranger = (pki.cert, pki.key)
        assert await refused(secure_channel(server, pki.ca, stranger)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def replace(source: Path, target: Path) -> None:
    """Copy ``source`` over ``target`` by rename, as a rotation should write."""
    temporary = target.with_suffix(".new")
    temporary.write_bytes(source.read_bytes())
    os.replace(temporary, target)


async def test_new_connections_see_a_replaced_certificate(
    catalog: Path, pki: Pki, tmp_path: Path
) -> None:
    renewed = make_pki(tmp_path / "renewed")
    async with tls_serving(catalog, pki) as server:
        old = secure_channel(server, pki.ca)
        assert await health(old) == SERVING
        replace(renewed.cert, pki.cert)
        replace(renewed.key, pki.key)

        async def renewed_is_served() -> bool:
            async with secure_channel(server, renewed.ca) as channel:
                try:
                    return await health(channel) == SERVING
                except grpc.aio.AioRpcError:
                    return False

        await until(renewed_is_served, "a new connection gets the renewed certificate")
        assert await refused(secure_channel(server, pki.ca)) == grpc.StatusCode.UNAVAILABLE
        assert await health(old) == SERVING, "an open connection keeps its certificate"
        await old.close()


async def test_a_pair_that_does_not_load_keeps_the_last_certificate(
    catalog: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_pki(tmp_path / "other")
    async with tls_serving(catalog, pki) as server:
        replace(other.key, pki.key)  # a key that is not the certificate's
        files = CertificateFiles(pki.cert, pki.key)
        with pytest.raises(ValueError, match=str(pki.cert)):
            files.load()
        with caplog.at_level("WARNING", logger="sie_server.grpc_api.tls"):
            for _ in range(2):  # each connection looks again, and keeps the old pair
                async with secure_channel(server, pki.ca) as channel:
                    assert await health(channel) == SERVING
        assert "do not load, keeping the last ones" in caplog.text
        replace(other.cert, pki.cert)  # the rotation completes

        async def completed() -> bool:
            async with secure_channel(server, other.ca) as channel:
                try:
                    return await health(channel) == SERVING
                except grpc.aio.AioRpcError:
                    return False

        await until(completed, "the completed rotation is served")


# ---- the SDK and the bridge ----------------------------------------------------------------------


def test_sdk_tls_parameters_parse(pki: Pki) -> None:
    plain = parse_target("grpc://127.0.0.1:1")
    assert (plain.address, plain.tls) == ("127.0.0.1:1", None)
    system = parse_target("grpcs://sie.example:443")
    assert system.tls is not None
    assert system.tls.ca is None
    full = parse_target(
        f"grpcs://127.0.0.1:1,127.0.0.2:1?tls_ca={pki.ca}&tls_cert={pki.client_cert}"
        f"&tls_key={pki.client_key}"
    )
    assert full.address == "ipv4:127.0.0.1:1,127.0.0.2:1"
    assert full.tls is not None
    assert (full.tls.ca, full.tls.cert, full.tls.key) == (pki.ca, pki.client_cert, pki.client_key)
    with pytest.raises(ValueError, match="grpcs://"):
        parse_target(f"grpc://127.0.0.1:1?tls_ca={pki.ca}")
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_target(f"grpcs://127.0.0.1:1?ca={pki.ca}")
    with pytest.raises(ValueError, match="needs its key"):
        parse_target(f"grpcs://127.0.0.1:1?tls_cert={pki.client_cert}")


async def test_sdk_connects_with_tls_parameters(catalog: Path, pki: Pki) -> None:
    async with tls_serving(catalog, pki, mutual=True) as server:
        url = (
            f"grpcs://{server.address}?tls_ca={pki.ca}"
            f"&tls_cert={pki.client_cert}&tls_key={pki.client_key}"
        )
        async with SIEAsyncClient(url) as client:
            result = await client.encode(FAKE, {"text": "hello"})
            assert result["dense"].shape == (2,)
        async with SIEAsyncClient(f"grpcs://{server.address}?tls_ca={pki.ca}") as client:
            with pytest.raises(SIEConnectionError):  # mTLS: no client certificate
                await client.encode(FAKE, {"text": "hello"}, provision_timeout_s=0)
        async with SIEAsyncClient(server.address) as client:  # plaintext
            with pytest.raises(SIEConnectionError):
                await client.encode(FAKE, {"text": "hello"}, provision_timeout_s=0)


async def test_bridge_backend_channel_over_mtls(catalog: Path, pki: Pki) -> None:
    async with tls_serving(catalog, pki, mutual=True) as server:
        async with bridged(
            server.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
        ) as http:
            await assert_serves_fake(http, FAKE)
        body = {"items": [{"text": "hello"}]}
        async with bridged(server.address, tls_ca=pki.ca) as http:  # no client certificate
            async with http.session.get("/readyz") as response:
                assert response.status == 503
            async with http.session.post(
                f"/v1/encode/{FAKE}", json=body, headers=JSON_HEADERS
            ) as response:
                assert response.status == 503
                assert (await response.json())["detail"]["code"] == "BACKEND_UNAVAILABLE"


async def test_the_bridge_follows_rotated_backend_certificates(
    catalog: Path, pki: Pki, tmp_path: Path
) -> None:
    """Both sides rotate to a new PKI (new server CA, new client CA): the server serves the new
    certificate on new connections, the bridge sees its files change, opens a new channel with
    them, and calls keep succeeding through it."""
    from sie_bridge.state import UPSTREAM

    mine = tmp_path / "bridge"
    mine.mkdir()
    ca, cert, key = mine / "ca.pem", mine / "client.pem", mine / "client.key"
    for source, target in ((pki.ca, ca), (pki.client_cert, cert), (pki.client_key, key)):
        replace(source, target)
    renewed = make_pki(tmp_path / "renewed")
    body = {"items": [{"text": "hello"}]}
    async with (
        tls_serving(catalog, pki, mutual=True) as server,
        bridged(server.address, tls_ca=ca, tls_cert=cert, tls_key=key) as http,
    ):
        upstream = http.bridge.runner.app[UPSTREAM]
        first = upstream.channel
        async with http.session.post(f"/v1/encode/{FAKE}", json=body) as response:
            assert response.status == 200, await response.text()
        for source, target in (
            (renewed.cert, pki.cert),
            (renewed.key, pki.key),
            (renewed.client_ca, pki.client_ca),
        ):
            replace(source, target)
        for source, target in (
            (renewed.ca, ca),
            (renewed.client_cert, cert),
            (renewed.client_key, key),
        ):
            replace(source, target)

        async def switched() -> bool:
            return upstream.channel is not first

        await until(switched, "the bridge opens a channel with the rotated files")
        # The new channel connects anew: only the renewed CA verifies the server now, and
        # only the renewed client certificate is accepted.
        async with http.session.post(f"/v1/encode/{FAKE}", json=body) as response:
            assert response.status == 200, await response.text()
        async with http.session.get("/readyz") as response:
            assert response.status == 200
