"""API keys on the gRPC server: no key or a wrong one is UNAUTHENTICATED with our ErrorInfo, the
right one works, health and reflection stay open, the key file reloads, and the SDK raises
``AuthenticationError`` after exactly one attempt. The pieces (``ApiKeys``, settings) are tested
on their own at the end."""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sie_sdk import SIEAsyncClient
from sie_sdk.api_keys import ApiKeys, bearer_token, parse_key_file, split_keys
from sie_sdk.client.errors import AuthenticationError, RequestError
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, status_pb2, status_pb2_grpc
from sie_server.config import load_settings
from sie_server.grpc_api.auth import RequireApiKey

from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    error_info,
    fake_entry,
    serving,
    write_catalog_entry,
)

FAKE = "fake/auth"
KEY = "right-key"
ENCODE = encode_pb2.EncodeRequest(model=FAKE, items=[common_pb2.Item(text="hello")])


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("auth") / "catalog"
    write_catalog_entry(folder, fake_entry(FAKE))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog], [FAKE], api_keys=(KEY, "other-key")) as handle:
        yield handle


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ---- gRPC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer("wrong-key"),
        bearer(""),
        (("authorization", KEY),),  # the key without its scheme
        (("authorization", f"Basic {KEY}"),),
        bearer(KEY + "x"),
    ],
    ids=["none", "wrong", "empty", "no-scheme", "basic", "longer"],
)
async def test_encode_without_a_valid_key_is_unauthenticated(
    server: ServerHandle, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    error = await refused(stub.Encode(ENCODE, metadata=metadata, timeout=HANG_GUARD_S))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    reason, _, retry = error_info(error)
    assert reason == "UNAUTHENTICATED"
    assert retry is None, "an auth failure is not retryable"
    assert "API key" in (error.details() or "")


async def test_encode_with_a_configured_key_works(server: ServerHandle) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    for metadata in (bearer(KEY), bearer("other-key"), (("authorization", f"bearer  {KEY} "),)):
        reply = await stub.Encode(ENCODE, metadata=metadata, timeout=HANG_GUARD_S)
        assert reply.items[0].dense.values.shape == [2]


async def test_server_streaming_status_needs_a_key(server: ServerHandle) -> None:
    stub = status_pb2_grpc.StatusServiceStub(server.channel)
    request = status_pb2.WatchStatusRequest(interval_ms=50)
    denied = stub.WatchStatus(request, timeout=HANG_GUARD_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await denied.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value)[0] == "UNAUTHENTICATED"
    allowed = stub.WatchStatus(request, metadata=bearer(KEY), timeout=HANG_GUARD_S)
    message = await allowed.read()
    allowed.cancel()
    assert FAKE in {model.name for model in message.models}


async def test_health_and_reflection_stay_open(server: ServerHandle) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for metadata in ((), bearer("wrong-key")):
        reply = await health.Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=HANG_GUARD_S
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    stream = stub.ServerReflectionInfo(timeout=HANG_GUARD_S)
    await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await stream.read()
    await stream.done_writing()
    services = {s.name for s in reply.list_services_response.service}
    assert "sie.v1.EncodeService" in services


async def echo_unary(request: bytes, context: Any) -> bytes:
    return request


async def echo_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield request


async def gather_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"".join([r async for r in requests])


async def gather_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def test_every_rpc_kind_is_checked() -> None:
    """Unary and streaming each way (our services have no client-streaming RPC yet; the
    interceptor refuses one all the same)."""
    server = grpc.aio.server(interceptors=[RequireApiKey(ApiKeys([KEY]))])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(gather_unary),
        "BothStream": grpc.stream_stream_rpc_method_handler(gather_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = {
                "Unary": lambda md: channel.unary_unary("/test.Echo/Unary")(b"x", metadata=md),
                "ServerStream": lambda md: channel.unary_stream("/test.Echo/ServerStream")(
                    b"x", metadata=md
                ).read(),
                "ClientStream": lambda md: channel.stream_unary("/test.Echo/ClientStream")(
                    iter([b"x"]), metadata=md
                ),
                "BothStream": lambda md: channel.stream_stream("/test.Echo/BothStream")(
                    iter([b"x"]), metadata=md
                ).read(),
            }
            for name, call in calls.items():
                error = await refused(call(()))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert error_info(error)[0] == "UNAUTHENTICATED", name
                assert await call(bearer(KEY)) == b"x", name
    finally:
        await server.stop(None)


# ---- the key file --------------------------------------------------------------------------------


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to a sibling and rename it over ``path`` (how a rotation should write)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def test_the_key_file_is_reloaded_when_it_changes(catalog: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\n\n  old-key  \n")
    async with serving([catalog], [FAKE], api_keys_file=keys) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)

        async def works(key: str) -> bool:
            try:
                await stub.Encode(ENCODE, metadata=bearer(key), timeout=HANG_GUARD_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                return False
            return True

        assert await works("old-key")
        assert not await works("# rotated monthly"), "a comment is not a key"
        assert not await works("new-key")
        replace_file(keys, "new-key\n")
        await until(lambda: works("new-key"), "the new key works")
        assert not await works("old-key"), "the replaced key stopped working"
        # Written in place (not renamed) counts too.
        keys.write_text("new-key\nthird-key\n")
        await until(lambda: works("third-key"), "a key appended in place works")
        assert await works("new-key")


# ---- the SDK -------------------------------------------------------------------------------------


async def test_sdk_raises_authentication_error_without_retrying(server: ServerHandle) -> None:
    for api_key in (None, "wrong-key"):
        client = SIEAsyncClient(server.address, api_key=api_key)
        sends = 0
        send = client._transport.send

        async def counted(*args: Any, _send: Any = send) -> Any:
            nonlocal sends
            sends += 1
            return await _send(*args)

        client._transport.send = counted  # type: ignore[method-assign]
        try:
            with pytest.raises(AuthenticationError) as caught:
                await client.encode(FAKE, {"text": "hello"}, provision_timeout_s=30)
        finally:
            await client.close()
        assert isinstance(caught.value, RequestError), "4xx handlers still catch it"
        assert (caught.value.code, caught.value.status_code) == ("UNAUTHENTICATED", 401)
        assert sends == 1, "an auth failure is not retried"
    async with SIEAsyncClient(server.address, api_key=KEY) as client:
        result = await client.encode(FAKE, {"text": "hello"})
        assert result["dense"].shape == (2,)


async def test_sdk_encode_stream_raises_authentication_error_not_a_broken_stream(
    server: ServerHandle,
) -> None:
    """A refused stream whose client is still writing: grpc aio reports INTERNAL (a broken
    stream, retried for seconds and then BACKEND_UNAVAILABLE) unless the client waits for the
    server's headers before its second message (grpc/grpc#36066)."""
    for _ in range(5):
        async with SIEAsyncClient(server.address, api_key="wrong-key") as client:
            items = ({"text": f"text {index}"} for index in range(2000))
            with pytest.raises(AuthenticationError):
                async for _result in client.encode_stream(FAKE, items, batch_size=4, window=8):
                    pass
    async with SIEAsyncClient(server.address, api_key=KEY) as client:
        results = [r async for r in client.encode_stream(FAKE, [{"text": "a"}] * 40, batch_size=4)]
        assert len(results) == 40
        assert all(not isinstance(result, Exception) for result in results)


# ---- the pieces ----------------------------------------------------------------------------------


def test_key_lists_and_files_parse() -> None:
    assert split_keys(" a, b ,,c ") == ("a", "b", "c")
    assert parse_key_file("# comment\n\n a \r\nb\n  # indented comment\n") == ("a", "b")
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bEaReR   abc  ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token("abc") is None
    assert bearer_token(None) is None


def test_every_key_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ApiKeys(["first", "second", "a-much-longer-third-key"])
    assert keys.allows("first")
    assert len(calls) == 3, "no early exit on the first key"
    assert set(calls) == {32}, "digests of equal length whatever the key's length"
    calls.clear()
    assert not keys.allows("nope")
    assert len(calls) == 3


def test_checking_is_off_only_without_keys_and_file(tmp_path: Path) -> None:
    assert ApiKeys().allows(None)
    assert not ApiKeys().enabled
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    refuse_all = ApiKeys(file=empty)
    assert refuse_all.enabled
    assert not refuse_all.allows(None)
    assert not refuse_all.allows("anything")


def test_a_file_that_breaks_keeps_its_last_keys(tmp_path: Path) -> None:
    now = [0.0]
    file = tmp_path / "keys"
    file.write_text("k1\n")
    keys = ApiKeys(["fixed"], file, reload_interval_s=1.0, clock=lambda: now[0])
    assert keys.allows("k1")
    assert keys.allows("fixed")
    file.write_text("k2\n")
    assert keys.allows("k1"), "not re-read before the interval"
    now[0] = 1.0
    assert keys.allows("k2")
    assert not keys.allows("k1")
    file.unlink()
    now[0] = 2.0
    assert keys.allows("k2"), "a vanished file keeps its last keys"
    assert keys.allows("fixed")


def test_settings_read_keys_and_tls_files(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    settings = load_settings([], {"SIE_API_KEYS": "a, b", "SIE_API_KEYS_FILE": str(keys)})
    assert settings.api_keys == ("a", "b")
    assert settings.api_keys_file == keys
    assert load_settings(["--api-keys", "x", "--api-keys", "y"], {}).api_keys == ("x", "y")
    with pytest.raises(SystemExit, match="no such file"):
        load_settings(["--api-keys-file", str(tmp_path / "missing")], {})
    with pytest.raises(SystemExit, match="go together"):
        load_settings(["--tls-cert", str(keys)], {})
    with pytest.raises(SystemExit, match="mTLS"):
        load_settings(["--tls-client-ca", str(keys)], {})
