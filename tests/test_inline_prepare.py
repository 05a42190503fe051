"""A lone request of one short text is prepared and finished on the event loop, without the two
round trips to the tokenizer pool (``ModelRegistry._run``); every other request keeps the pools:
several texts, a text over ``--inline-max-chars``, a request that arrives while another is in
the server, and every request with ``--inline-max-chars 0``. Replies and errors are the same
either way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
import torch
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.config import load_settings
from sie_server.domain import EncodeOutput, InputItem, TokenizedText
from sie_server.engine.openmp import thread_width
from sie_server.errors import InvalidInput
from sie_server.tasks.encode import EncodeCall, EncodedItem, EncodeSettings

from tests.fakes import FakeAdapter, expected_vector
from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    error_info,
    eventually,
    fake_adapter,
    fake_entry,
    serving,
    write_catalog_entry,
)

MODEL = "fake/inline"
REFUSED = "refuse"


class ThreadRecordingFake(FakeAdapter):
    """The fake encoder, recording the thread that prepares and finishes each request (by its
    texts); it refuses the text ``REFUSED`` while preparing."""

    prepared: ClassVar[dict[tuple[str, ...], str]] = {}
    finished: ClassVar[dict[tuple[str, ...], str]] = {}
    #: torch's thread count where each request was prepared and finished.
    widths: ClassVar[dict[tuple[str, ...], tuple[int, int]]] = {}

    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[TokenizedText]:
        texts = tuple(item.text or "" for item in items)
        ThreadRecordingFake.prepared[texts] = threading.current_thread().name
        ThreadRecordingFake.widths[texts] = (torch.get_num_threads(), 0)
        if REFUSED in texts:
            raise InvalidInput(f"the fake refuses {REFUSED!r}", model=self.spec.name)
        return super().prepare_encode(items, settings)

    def postprocess_encode(
        self, outputs: Sequence[EncodeOutput], payloads: Sequence[TokenizedText], call: EncodeCall
    ) -> list[EncodedItem]:
        texts = tuple(item.text or "" for item in call.items)
        ThreadRecordingFake.finished[texts] = threading.current_thread().name
        prepared_width, _ = ThreadRecordingFake.widths[texts]
        ThreadRecordingFake.widths[texts] = (prepared_width, torch.get_num_threads())
        return super().postprocess_encode(outputs, payloads, call)


@asynccontextmanager
async def server(tmp_path: Path, **overrides: Any) -> AsyncIterator[ServerHandle]:
    folder = tmp_path / "catalog"
    write_catalog_entry(folder, fake_entry(MODEL, adapter=f"{__name__}:ThreadRecordingFake"))
    async with serving([folder], preload=[MODEL], **overrides) as handle:
        yield handle


async def encode(handle: ServerHandle, *texts: str) -> list[np.ndarray[Any, Any]]:
    stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
    request = encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text=t) for t in texts])
    reply = await stub.Encode(request, timeout=HANG_GUARD_S)
    return [from_tensor(item.dense.values) for item in reply.items]


def threads(*texts: str) -> tuple[str, str]:
    """(preparing thread, finishing thread) of the request of ``texts``."""
    return ThreadRecordingFake.prepared[texts], ThreadRecordingFake.finished[texts]


def in_pool(names: tuple[str, str]) -> bool:
    return all(name.startswith("sie-tokenize") for name in names)


async def test_a_lone_short_text_is_prepared_and_finished_on_the_event_loop(
    tmp_path: Path,
) -> None:
    async with server(tmp_path) as handle:
        (vector,) = await encode(handle, "a lone query")
        assert threads("a lone query") == (threading.current_thread().name,) * 2
        np.testing.assert_array_equal(vector, expected_vector("a lone query"))
        exactly = "x" * 1000  # the default --inline-max-chars
        await encode(handle, exactly)
        assert threads(exactly) == (threading.current_thread().name,) * 2


async def test_inline_work_runs_torch_serially_and_the_loop_keeps_its_own_width(
    tmp_path: Path,
) -> None:
    """Like the pools' threads (openmp.py), the loop's thread makes no OpenMP team of its own
    while it prepares or finishes a request; its own count is back afterwards."""
    before = torch.get_num_threads()
    thread_width(2)
    try:
        async with server(tmp_path) as handle:
            await encode(handle, "serial on the loop")
            assert threads("serial on the loop") == (threading.current_thread().name,) * 2
            assert ThreadRecordingFake.widths[("serial on the loop",)] == (1, 1)
            assert torch.get_num_threads() == 2
    finally:
        thread_width(before)


async def test_several_texts_or_a_longer_one_keep_the_tokenizer_pool(tmp_path: Path) -> None:
    async with server(tmp_path) as handle:
        first, second = await encode(handle, "one text", "another text")
        assert in_pool(threads("one text", "another text"))
        np.testing.assert_array_equal(first, expected_vector("one text"))
        np.testing.assert_array_equal(second, expected_vector("another text"))
        longer = "y" * 1001
        (vector,) = await encode(handle, longer)
        assert in_pool(threads(longer))
        np.testing.assert_array_equal(vector, expected_vector(longer, 64))


async def test_a_request_arriving_while_another_is_in_the_server_uses_the_pool(
    tmp_path: Path,
) -> None:
    async with server(tmp_path) as handle:
        adapter = fake_adapter(handle, MODEL)
        before = adapter.passes_started
        adapter.hold()
        try:
            first = asyncio.create_task(encode(handle, "first query"))
            await eventually(lambda: adapter.passes_started > before, "the first pass starts")
            second = asyncio.create_task(encode(handle, "second query"))
            await eventually(
                lambda: ("second query",) in ThreadRecordingFake.prepared, "the second prepares"
            )
        finally:
            adapter.release()
        (one,), (two,) = await asyncio.gather(first, second)
        assert threads("first query")[0] == threading.current_thread().name
        assert ThreadRecordingFake.prepared[("second query",)].startswith("sie-tokenize")
        np.testing.assert_array_equal(one, expected_vector("first query"))
        np.testing.assert_array_equal(two, expected_vector("second query"))
        # Both done: the next lone request is alone again.
        await encode(handle, "third query")
        assert threads("third query") == (threading.current_thread().name,) * 2


async def test_with_inline_max_chars_0_every_request_uses_the_pool(tmp_path: Path) -> None:
    async with server(tmp_path, inline_max_chars=0) as handle:
        (vector,) = await encode(handle, "q")
        assert in_pool(threads("q"))
        np.testing.assert_array_equal(vector, expected_vector("q"))


async def test_an_error_while_preparing_inline_reaches_the_client_as_from_the_pool(
    tmp_path: Path,
) -> None:
    async with server(tmp_path) as handle:
        answers = []
        for texts in ((REFUSED,), (REFUSED, "and another")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await encode(handle, *texts)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            reason, _, _ = error_info(refused.value)
            answers.append((reason, refused.value.details()))
        assert ThreadRecordingFake.prepared[(REFUSED,)] == threading.current_thread().name
        assert ThreadRecordingFake.prepared[(REFUSED, "and another")].startswith("sie-tokenize")
        assert answers[0] == answers[1]
        assert answers[0][0] == "INVALID_INPUT"
        assert REFUSED in (answers[0][1] or "")
        # The refused request left the server: the next lone one is alone.
        await encode(handle, "after the refusal")
        assert threads("after the refusal") == (threading.current_thread().name,) * 2


def test_inline_max_chars_is_a_setting_checked_at_start() -> None:
    assert load_settings([], {}).inline_max_chars == 1000
    assert load_settings([], {"SIE_INLINE_MAX_CHARS": "0"}).inline_max_chars == 0
    assert load_settings(["--inline-max-chars", "200"], {}).inline_max_chars == 200
    with pytest.raises(SystemExit, match="--inline-max-chars must be 0"):
        load_settings(["--inline-max-chars", "-1"], {})
