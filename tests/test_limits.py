"""Request limits, configurable and enforced before any work: items, characters per text (a
query included), labels per request, and responses over the message limit each answer
INVALID_INPUT naming the limit and its flag; a gRPC request message over the message limit is
RESOURCE_EXHAUSTED (``REQUEST_TOO_LARGE``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sie_sdk import SIEAsyncClient
from sie_sdk.client.errors import RequestError
from sie_sdk.reasons import STATUS_DETAILS_KEY
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.catalog.spec import parse_spec
from sie_server.domain import InputItem
from sie_server.errors import ECHO_CHARS, InvalidInput, ModelNotFound, shortened
from sie_server.grpc_api.errors import MAX_MESSAGE_CHARS, status_for
from sie_server.tasks.common import RequestLimits
from sie_server.tasks.extract import ExtractParams, ExtractSupport, resolve_extract
from sie_server.tasks.score import ScoreParams, resolve_score

from tests.server_utils import error_info, fake_entry, serving, write_catalog_entry
from tests.tiny_models import bge_m3
from tests.tiny_models.entries import BGE_M3_OUTPUTS, entry

LIMITS = RequestLimits(max_items=3, max_text_chars=20, max_labels=2)
SPEC = parse_spec(
    {
        "name": "m",
        "adapter": "dense",
        "hf_id": "x/y",
        "max_sequence_length": 16,
        "outputs": {"dense": {"dims": 4}},
    }
)


def test_labels_over_the_limit_are_refused() -> None:
    support = ExtractSupport()
    ok = resolve_extract(
        SPEC, [InputItem(text="a")], ExtractParams(labels=["x", "y"]),
        support=support, accepted_options=(), limits=LIMITS,
    )  # fmt: skip
    assert ok.settings.labels == ("x", "y")
    with pytest.raises(InvalidInput, match=r"3 labels exceed the limit of 2 .*--max-labels"):
        resolve_extract(
            SPEC, [InputItem(text="a")], ExtractParams(labels=["x", "y", "z"]),
            support=support, accepted_options=(), limits=LIMITS,
        )  # fmt: skip


def test_a_long_query_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"query 0: text of 21 characters .*--max-text-chars"):
        resolve_score(
            SPEC, InputItem(text="q" * 21), [InputItem(text="a")], ScoreParams(),
            accepted_options=(), limits=LIMITS,
        )  # fmt: skip


async def test_limits_come_from_the_server_flags(tmp_path: Path) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry("fake/limits"))
    async with serving(
        [tmp_path / "catalog"], ["fake/limits"], max_text_chars=20, max_items_per_request=3
    ) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)

        def request(*texts: str) -> encode_pb2.EncodeRequest:
            return encode_pb2.EncodeRequest(
                model="fake/limits", items=[common_pb2.Item(text=t) for t in texts]
            )

        reply = await stub.Encode(request("short", "x" * 20))
        assert len(reply.items) == 2
        with pytest.raises(grpc.aio.AioRpcError) as long_text:
            await stub.Encode(request("short", "x" * 21))
        assert long_text.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(long_text.value)[0] == "INVALID_INPUT"
        assert "item 1: text of 21 characters" in (long_text.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await stub.Encode(request("a", "b", "c", "d"))
        assert "4 items exceed the limit of 3" in (too_many.value.details() or "")


async def test_a_response_over_the_message_limit_is_refused_before_any_compute(
    tmp_path: Path,
) -> None:
    weights = bge_m3.build_tiny_bge_m3(tmp_path / "bge-m3")
    write_catalog_entry(
        tmp_path / "catalog", entry("tiny/bge-m3", "bge_m3", weights, BGE_M3_OUTPUTS)
    )
    limit = 64 * 1024  # multivector rows of the tiny model are 128 bytes: ~500 tokens fit
    async with serving([tmp_path / "catalog"], ["tiny/bge-m3"], max_message_bytes=limit) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        metrics = handle.running.registry.metrics

        def request(count: int) -> encode_pb2.EncodeRequest:
            words = " ".join(f"token{i}" for i in range(60))
            return encode_pb2.EncodeRequest(
                model="tiny/bge-m3",
                items=[common_pb2.Item(text=words) for _ in range(count)],
                params=encode_pb2.EncodeParams(output_types=["multivector"]),
            )

        reply = await stub.Encode(request(1))
        assert reply.items[0].multivector.num_tokens > 60
        batches = metrics.counter("sie_batches_total", model="tiny/bge-m3", status="ok")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Encode(request(32))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(refused.value)[0] == "INVALID_INPUT"
        details = refused.value.details() or ""
        assert "over the message limit" in details
        assert "--max-message-bytes" in details
        assert "split the request" in details
        fit = int(error_info(refused.value)[1]["items_that_fit"])
        assert 1 <= fit < 32, "fewer items than were sent, so that splitting helps"
        after = metrics.counter("sie_batches_total", model="tiny/bge-m3", status="ok")
        assert after == batches, "no forward pass was spent on it"


async def test_a_grpc_request_over_the_message_limit_is_refused_and_the_server_serves_on(
    tmp_path: Path,
) -> None:
    """grpc refuses a request message over ``--max-message-bytes`` before the servicer, as
    RESOURCE_EXHAUSTED with the sizes; the SDK reads it as ``REQUEST_TOO_LARGE`` (413)."""
    write_catalog_entry(tmp_path / "catalog", fake_entry("fake/bytes"))
    limit = 4096
    async with serving(
        [tmp_path / "catalog"], ["fake/bytes"], max_message_bytes=limit, max_text_chars=10**6
    ) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)

        def request(chars: int) -> encode_pb2.EncodeRequest:
            return encode_pb2.EncodeRequest(
                model="fake/bytes", items=[common_pb2.Item(text="x" * chars)]
            )

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Encode(request(2 * limit))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"vs. {limit}" in (refused.value.details() or ""), refused.value.details()
        async with SIEAsyncClient(handle.address) as client:
            with pytest.raises(RequestError) as caught:
                await client.encode("fake/bytes", {"text": "x" * (2 * limit)})
            assert (caught.value.code, caught.value.status_code) == ("REQUEST_TOO_LARGE", 413)
            served = await client.encode("fake/bytes", {"text": "x" * (limit // 2)})
        assert served["dense"].shape == (2,)


def test_an_error_repeats_little_of_a_long_input() -> None:
    """What a status repeats of a client's text stays far below the 16 KiB of trailers a gRPC
    client accepts, however long the text (a model name of any length)."""
    name = "m" * 50_000
    code, message, trailers = status_for(ModelNotFound(f"no {name}", model=name))
    assert code == grpc.StatusCode.NOT_FOUND
    assert len(message) < MAX_MESSAGE_CHARS + 40
    assert message.endswith(f"({len(name) + 3} characters)")
    assert sum(len(value) for _, value in trailers) < 4 * 1024
    details = status_pb2.Status.FromString(dict(trailers)[STATUS_DETAILS_KEY])
    info = error_details_pb2.ErrorInfo()
    details.details[0].Unpack(info)
    assert info.metadata["model"] == shortened(name)
    assert shortened(name).startswith("m" * ECHO_CHARS + "... (50000 characters)")
    assert shortened("short/name") == "short/name"
    wide = "\U0001f600" * 50_000  # four bytes each, percent-encoded to twelve in grpc-message
    _, message, trailers = status_for(ModelNotFound(wide, model="m"))
    assert len(message.encode()) <= MAX_MESSAGE_CHARS + 40
    assert 3 * len(message.encode()) + sum(len(value) for _, value in trailers) < 12 * 1024
