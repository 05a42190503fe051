"""``RejectMalformed`` on a client-streaming method: no service has one yet, so a test service
here stands for the first that will (and, for a servicer that never reads, a bidirectional one). A message that does not parse refuses the whole call with
INVALID_ARGUMENT / ``INVALID_INPUT`` naming the message, never UNKNOWN or INTERNAL, and the
servicer's answer for the messages before it is dropped (it has one answer for all of them)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from sie_server.config import Settings
from sie_server.grpc_api.interceptors import RejectMalformed, StreamDrain

from tests.server_utils import CORRUPT, error_info

METHOD = "/test.Collect/Join"


class Collect:
    """Joins the strings of a client stream; remembers what it read."""

    def __init__(self) -> None:
        self.read: list[str] = []

    async def join(self, requests: AsyncIterator[wrappers_pb2.StringValue], _: Any) -> Any:
        async for request in requests:
            self.read.append(request.value)
        return wrappers_pb2.StringValue(value="+".join(self.read))

    async def ignore(self, _: AsyncIterator[wrappers_pb2.StringValue], __: Any) -> Any:
        return wrappers_pb2.StringValue(value="not read")

    async def ignore_both_ways(
        self, _: AsyncIterator[wrappers_pb2.StringValue], __: Any
    ) -> AsyncIterator[wrappers_pb2.StringValue]:
        yield wrappers_pb2.StringValue(value="not read")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Collect, grpc.aio.Channel]]:
    servicer = Collect()
    handlers = {
        name: grpc.stream_unary_rpc_method_handler(
            behavior,
            request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString,
        )
        for name, behavior in (("Join", servicer.join), ("Ignore", servicer.ignore))
    }
    handlers["IgnoreBothWays"] = grpc.stream_stream_rpc_method_handler(
        servicer.ignore_both_ways,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    defaults = Settings()
    drain = StreamDrain(defaults.stream_drain_idle_s, defaults.stream_drain_limit_s)
    server = grpc.aio.server(interceptors=[RejectMalformed(drain)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Collect", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, channel
    finally:
        await channel.close()
        await server.stop(None)


def raw(channel: grpc.aio.Channel, method: str = METHOD) -> Any:
    """The method, taking serialized messages as they are (good or not)."""
    return channel.stream_unary(
        method,
        request_serializer=lambda data: data,
        response_deserializer=wrappers_pb2.StringValue.FromString,
    )


def strings(*values: str) -> list[bytes]:
    return [wrappers_pb2.StringValue(value=v).SerializeToString() for v in values]


async def test_a_good_client_stream_is_answered(served: tuple[Collect, grpc.aio.Channel]) -> None:
    servicer, channel = served
    reply = await raw(channel)(iter(strings("a", "b", "c")), timeout=10)
    assert reply.value == "a+b+c"
    assert servicer.read == ["a", "b", "c"]


async def test_a_malformed_message_refuses_the_call_and_names_the_message(
    served: tuple[Collect, grpc.aio.Channel],
) -> None:
    servicer, channel = served
    sent = [*strings("a", "b"), CORRUPT, *strings("c")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(channel)(iter(sent), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value)[0] == "INVALID_INPUT"
    details = caught.value.details() or ""
    assert "not a valid message" in details
    assert "message 3 of the stream" in details
    assert "no message of it answered" in details
    # The servicer saw the stream end at the bad message; nothing after it reached it.
    assert servicer.read == ["a", "b"]


async def test_a_client_still_writing_after_the_bad_message_gets_the_refusal(
    served: tuple[Collect, grpc.aio.Channel],
) -> None:
    """grpc's aio client reports INTERNAL when the status lands while it still writes
    (grpc/grpc#36066): the refusal waits until the client has sent everything."""
    servicer, channel = served

    def messages() -> Iterator[bytes]:
        yield from strings("a")
        yield CORRUPT
        yield from strings(*(str(i) for i in range(200)))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(channel)(messages(), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2 of the stream" in (caught.value.details() or "")
    assert servicer.read == ["a"]


async def test_a_servicer_that_never_reads_its_stream_leaves_nothing_unawaited(
    served: tuple[Collect, grpc.aio.Channel],
) -> None:
    """grpc makes a stream's receiving generator on the first ``aiter`` of it; one that is never
    read warns "never awaited" when collected (an error in this suite), so the interceptor
    must not make it for a servicer that answers without reading, on a client stream or a
    bidirectional one (``EncodeStream``'s kind, where clean-clone CI caught it)."""
    _, channel = served
    both_ways = channel.stream_stream(
        "/test.Collect/IgnoreBothWays",
        request_serializer=lambda data: data,
        response_deserializer=wrappers_pb2.StringValue.FromString,
    )
    for _ in range(3):
        reply = await raw(channel, "/test.Collect/Ignore")(iter(strings("a")), timeout=10)
        assert reply.value == "not read"
        replies = [r.value async for r in both_ways(iter(strings("a")), timeout=10)]
        assert replies == ["not read"]
    gc.collect()
