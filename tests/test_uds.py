"""``--uds``: the server's services on a Unix domain socket too, for a bridge or a client on the
same host (``unix:///PATH``), and the refusals that keep it safe."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sie_sdk import SIEAsyncClient
from sie_server.config import load_settings
from sie_server.grpc_api.server import MAX_SOCKET_PATH_BYTES

from tests.bridge_utils import assert_serves_fake, bridged
from tests.server_utils import fake_model_server

FAKE = "fake/uds"


def kind(path: Path) -> str:
    """What is at ``path``: a socket, a file's text, or nothing."""
    if path.is_socket():
        return "socket"
    return path.read_text() if path.exists() else "nothing"


def put(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.fixture
def sock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A socket path short enough for ``sun_path`` whatever pytest's temp folder is called."""
    return tmp_path_factory.mktemp("uds") / "sie.sock"


async def test_the_socket_serves_what_the_port_serves_and_goes_at_stop(
    tmp_path: Path, sock: Path
) -> None:
    async with fake_model_server(tmp_path, FAKE, uds=sock) as server:
        assert kind(sock) == "socket"
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        texts = [{"text": "over the socket"}, {"text": "and a second, longer text"}]
        async with SIEAsyncClient(f"unix://{sock}") as local:
            over_socket = await local.encode(FAKE, texts)
        async with SIEAsyncClient(server.address) as remote:
            over_port = await remote.encode(FAKE, texts)
        assert [r["dense"].shape for r in over_socket] == [(2,), (2,)]
        for a, b in zip(over_socket, over_port, strict=True):
            np.testing.assert_array_equal(a["dense"], b["dense"])
    assert kind(sock) == "nothing", "the socket file is removed when the server stops"


async def test_the_bridge_reaches_the_server_over_its_socket(tmp_path: Path, sock: Path) -> None:
    async with fake_model_server(tmp_path, FAKE, uds=sock), bridged(f"unix://{sock}") as http:
        await assert_serves_fake(http, FAKE)


async def test_a_stale_socket_file_is_replaced(tmp_path: Path, sock: Path) -> None:
    """What a killed server leaves behind: a socket file nobody listens on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))
    assert kind(sock) == "socket"
    async with (
        fake_model_server(tmp_path, FAKE, uds=sock),
        SIEAsyncClient(f"unix://{sock}") as client,
    ):
        assert (await client.encode(FAKE, {"text": "hello"}))["dense"].shape == (2,)


async def test_a_live_servers_socket_is_not_taken(tmp_path: Path, sock: Path) -> None:
    async with fake_model_server(tmp_path / "first", FAKE, uds=sock):
        with pytest.raises(SystemExit, match="another process is listening"):
            async with fake_model_server(tmp_path / "second", FAKE, uds=sock):
                pass
        async with SIEAsyncClient(f"unix://{sock}") as client:  # the first still answers there
            assert (await client.encode(FAKE, {"text": "hello"}))["dense"].shape == (2,)


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing-folder/sie.sock", "its folder does not exist"),
        ("a-file", "a file is in the way"),
        (
            "x" * MAX_SOCKET_PATH_BYTES,
            f"a Unix socket's path can have at most {MAX_SOCKET_PATH_BYTES}",
        ),
    ],
)
async def test_a_socket_that_cannot_be_made_stops_the_start_with_why(
    tmp_path: Path, sock: Path, where: str, why: str
) -> None:
    path = sock.parent / where
    if where == "a-file":
        put(path, "not a socket")
    with pytest.raises(SystemExit, match=why):
        async with fake_model_server(tmp_path, FAKE, uds=path):
            pass
    if where == "a-file":
        assert kind(path) == "not a socket", "a file in the way is left as it was"


def test_uds_is_refused_beside_tls(tmp_path: Path) -> None:
    """The socket is plaintext: beside --tls-cert it would be a way around TLS and mTLS."""
    pem = tmp_path / "x.pem"
    argv = ["--uds", str(tmp_path / "s"), "--tls-cert", str(pem), "--tls-key", str(pem)]
    with pytest.raises(SystemExit, match="--uds serves plaintext"):
        load_settings(argv, environ={})
    assert load_settings(["--uds", str(tmp_path / "s")], environ={}).uds == tmp_path / "s"
