"""API keys through the HTTP bridge: the client's ``Authorization`` is forwarded to a server with
keys (401 + ``WWW-Authenticate: Bearer`` without it or with a wrong one, 200 with the right one);
a bridge with its own keys refuses at the door and talks to the server with its backend key;
probes, metrics, the contract and the status page stay open; the bridge's key file reloads; and
the SDK and the ``openai`` package raise their authentication errors without retrying."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from sie_bridge.config import load_settings
from sie_sdk import SIEAsyncClient, SIEClient
from sie_sdk.client.errors import AuthenticationError

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged
from tests.server_utils import HANG_GUARD_S, ServerHandle, fake_entry, serving, write_catalog_entry

FAKE = "fake/bridge-auth"
SERVER_KEY = "server-key"
CLIENT_KEY = "client-key"
BODY = {"items": [{"text": "hello"}]}
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/")


def auth(key: str) -> dict[str, str]:
    return {**JSON_HEADERS, "Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bridge-auth") / "catalog"
    write_catalog_entry(folder, fake_entry(FAKE))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog], [FAKE], api_keys=(SERVER_KEY,)) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def forwarding(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    """A bridge without keys of its own: the server checks the forwarded header."""
    async with bridged(server.address) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gatekeeper(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    """A bridge with its own client keys, talking to the server with its backend key."""
    async with bridged(
        server.address, api_keys=(CLIENT_KEY,), backend_api_key=SERVER_KEY
    ) as handle:
        yield handle


async def assert_unauthenticated(http: BridgeHandle, headers: dict[str, str]) -> str:
    """POST an encode; check the 401 and return its message."""
    async with http.session.post(f"/v1/encode/{FAKE}", json=BODY, headers=headers) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Retry-After" not in response.headers
        body = await response.json()
    assert set(body) == {"detail"}
    assert body["detail"]["code"] == "UNAUTHENTICATED"
    message: str = body["detail"]["message"]
    assert "API key" in message
    return message


async def encodes(http: BridgeHandle, key: str) -> bool:
    async with http.session.post(f"/v1/encode/{FAKE}", json=BODY, headers=auth(key)) as response:
        if response.status == 401:
            return False
        assert response.status == 200, await response.text()
        body = await response.json()
    assert len(body["items"][0]["dense"]["values"]) == 2
    return True


# ---- the server's keys, forwarded ----------------------------------------------------------------


async def test_forwarded_key_is_checked_by_the_server(forwarding: BridgeHandle) -> None:
    await assert_unauthenticated(forwarding, JSON_HEADERS)
    await assert_unauthenticated(forwarding, auth("wrong-key"))
    await assert_unauthenticated(forwarding, {**JSON_HEADERS, "Authorization": SERVER_KEY})
    assert await encodes(forwarding, SERVER_KEY)
    async with forwarding.session.get("/v1/models") as response:
        assert response.status == 401
    async with forwarding.session.get("/v1/models", headers=auth(SERVER_KEY)) as response:
        assert response.status == 200
        assert FAKE in {m["name"] for m in (await response.json())["models"]}


@pytest.mark.parametrize("path", OPEN_PATHS)
async def test_probes_metrics_and_contract_stay_open(forwarding: BridgeHandle, path: str) -> None:
    async with forwarding.session.get(path) as response:
        assert response.status == 200, path


async def test_metrics_show_the_server_only_with_a_backend_credential(
    forwarding: BridgeHandle, gatekeeper: BridgeHandle
) -> None:
    async with forwarding.session.get("/metrics") as response:
        text = await response.text()
    assert "sie_bridge_requests_total" in text
    assert "sie_model_loaded" not in text, "the server's status needs a key"
    async with gatekeeper.session.get("/metrics") as response:  # no client key: still open
        assert response.status == 200
        assert "sie_model_loaded" in await response.text(), "read with the backend key"


async def test_openai_client_gets_its_authentication_error(forwarding: BridgeHandle) -> None:
    url = f"{forwarding.url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="wrong-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.embeddings.create(model=FAKE, input="hello")
    assert refused.value.status_code == 401
    async with openai.AsyncOpenAI(base_url=url, api_key=SERVER_KEY, max_retries=0) as client:
        reply = await client.embeddings.create(model=FAKE, input="hello")
    assert len(reply.data[0].embedding) == 2


# ---- the bridge's own keys -----------------------------------------------------------------------


async def test_bridge_keys_are_checked_at_the_door(gatekeeper: BridgeHandle) -> None:
    missing = await assert_unauthenticated(gatekeeper, JSON_HEADERS)
    assert "bridge" not in missing
    wrong = await assert_unauthenticated(gatekeeper, auth(SERVER_KEY))
    assert "bridge" in wrong, "refused by the bridge, which does not know the server's key"
    assert await encodes(gatekeeper, CLIENT_KEY), "the bridge calls with its backend key"
    async with gatekeeper.session.get("/no/such/route") as response:
        assert response.status == 401, "no route is told to a client without a key"


@pytest.mark.parametrize("path", OPEN_PATHS)
async def test_open_paths_stay_open_on_a_bridge_with_keys(
    gatekeeper: BridgeHandle, path: str
) -> None:
    async with gatekeeper.session.get(path) as response:
        assert response.status == 200, path


async def test_status_socket_is_open_and_relayed_with_the_backend_key(
    gatekeeper: BridgeHandle,
) -> None:
    async with gatekeeper.session.ws_connect("/ws/status") as ws:
        message = await ws.receive_json(timeout=HANG_GUARD_S)
    assert FAKE in {model["name"] for model in message["models"]}


def test_bridge_settings_read_keys_and_tls(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    settings = load_settings(
        ["--backend", "grpcs://sie.internal:50051"],
        {
            "SIE_BRIDGE_API_KEYS": "a, b,",
            "SIE_BRIDGE_API_KEYS_FILE": str(keys),
            "SIE_BRIDGE_BACKEND_API_KEY": "backend",
            "SIE_BRIDGE_TLS_CA": str(keys),
        },
    )
    assert settings.api_keys == ("a", "b")
    assert settings.api_keys_file == keys
    assert settings.backend_api_key == "backend"
    assert settings.backend_target == "sie.internal:50051"
    assert settings.backend_tls is not None
    assert settings.backend_tls.ca == keys
    assert load_settings([], {}).backend_tls is None
    with pytest.raises(SystemExit, match="no such file"):
        load_settings([], {"SIE_BRIDGE_TLS_CA": str(tmp_path / "missing")})
    with pytest.raises(SystemExit, match="go together"):
        load_settings(["--tls-cert", str(keys)], {})


# ---- the key file --------------------------------------------------------------------------------


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def test_the_bridge_key_file_is_reloaded(server: ServerHandle, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# bridge clients\nold-key\n")
    async with bridged(server.address, api_keys_file=keys, backend_api_key=SERVER_KEY) as http:
        assert await encodes(http, "old-key")
        assert not await encodes(http, "new-key")
        temporary = tmp_path / "keys.tmp"
        temporary.write_text("new-key\n")
        os.replace(temporary, keys)

        async def new_works() -> bool:
            return await encodes(http, "new-key")

        await until(new_works, "the new key works")
        assert not await encodes(http, "old-key"), "the replaced key stopped working"


# ---- the SDK -------------------------------------------------------------------------------------


def counting_sends(client: SIEClient | SIEAsyncClient) -> list[int]:
    """Count the transport's sends (the retry loop calls ``send`` once per attempt)."""
    sends: list[int] = []
    send = client._transport.send
    if isinstance(client, SIEAsyncClient):

        async def counted_async(*args: Any) -> Any:
            sends.append(1)
            return await send(*args)

        client._transport.send = counted_async  # type: ignore[method-assign]
    else:

        def counted(*args: Any) -> Any:
            sends.append(1)
            return send(*args)

        client._transport.send = counted  # type: ignore[method-assign]
    return sends


async def test_sdk_over_http_raises_authentication_error_once(forwarding: BridgeHandle) -> None:
    async_client = SIEAsyncClient(forwarding.url, api_key="wrong-key")
    sends = counting_sends(async_client)
    try:
        with pytest.raises(AuthenticationError) as caught:
            await async_client.encode(FAKE, {"text": "hello"}, provision_timeout_s=30)
    finally:
        await async_client.close()
    assert (caught.value.code, caught.value.status_code) == ("UNAUTHENTICATED", 401)
    assert len(sends) == 1, "an auth failure is not retried"

    def sync_call() -> list[int]:
        with SIEClient(forwarding.url) as client:
            sync_sends = counting_sends(client)
            with pytest.raises(AuthenticationError):
                client.encode(FAKE, {"text": "hello"}, provision_timeout_s=30)
            return sync_sends

    assert len(await asyncio.to_thread(sync_call)) == 1
    async with SIEAsyncClient(forwarding.url, api_key=SERVER_KEY) as client:
        result = await client.encode(FAKE, {"text": "hello"})
    assert result["dense"].shape == (2,)


async def test_sdk_encode_stream_over_http_raises_authentication_error(
    forwarding: BridgeHandle,
) -> None:
    """A stream the server refuses as a whole, through the bridge: the SDK's clients raise
    ``AuthenticationError``, not a broken stream (the gRPC side: ``tests/test_auth.py``)."""

    def texts() -> Iterator[dict[str, str]]:
        return ({"text": f"text {index}"} for index in range(500))

    async with SIEAsyncClient(forwarding.url, api_key="wrong-key") as async_client:
        with pytest.raises(AuthenticationError):
            async for _ in async_client.encode_stream(FAKE, texts(), batch_size=4, window=8):
                pass

    def sync_stream() -> None:
        with (
            SIEClient(forwarding.url, api_key="wrong-key") as client,
            pytest.raises(AuthenticationError),
        ):
            for _ in client.encode_stream(FAKE, texts(), batch_size=4, window=8):
                pass

    await asyncio.to_thread(sync_stream)
