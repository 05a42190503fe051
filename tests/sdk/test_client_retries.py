"""The SDK's retries, for both clients over both transports: a model that is still loading (the
server answers MODEL_LOADING at once) and a full queue (QUEUE_FULL) are retried until the call
succeeds; ``provision_timeout_s`` bounds the waiting (a full queue ends in ServerError, a loading
model with no budget in ProvisioningError after one call); and a counting backend shows exactly
how many calls a retried reason costs, and that the others are not retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from sie_sdk import Item
from sie_sdk.client._throttle import MIN_REFUSALS
from sie_sdk.client.errors import ProvisioningError, ServerError, SIEError, error_class
from sie_sdk.tensors import to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.errors import SIEServerError
from sie_server.grpc_api.errors import status_for

from tests.bridge_utils import BridgeHandle, bridged
from tests.fakes import FakeAdapter, expected_vector
from tests.sdk.conftest import CASES, Case, Sdk, make_sdk
from tests.server_utils import (
    HANG_GUARD_S,
    ServerHandle,
    eventually,
    fake_entry,
    serving,
    write_catalog_entry,
)

HELD = "fake/held"
#: Tokens the server admits per model: two calls of 8 words (10 tokens each) leave no room for
#: a third of two such items.
MAX_PENDING_TOKENS = 30


def lazy(case: Case) -> str:
    """Loaded by ``case``'s retry test (slowly: warm-up passes sleep)."""
    return f"fake/lazy-{case.id}"


def cold(case: Case) -> str:
    """Never loaded before ``case``'s no-budget test."""
    return f"fake/cold-{case.id}"


def words(tag: str, n: int = 8) -> str:
    return " ".join([tag, *(f"w{i}" for i in range(n - 1))])


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdk-retries") / "catalog"
    write_catalog_entry(folder, fake_entry(HELD))
    for case in CASES:
        write_catalog_entry(folder, fake_entry(lazy(case), load_options={"delay_s": 0.3}))
        write_catalog_entry(folder, fake_entry(cold(case), load_options={"delay_s": 0.3}))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], [HELD], max_pending_tokens=MAX_PENDING_TOKENS) as handle:
        yield handle


def answered(server: ServerHandle, model: str, status: str) -> int:
    """How many Encode calls on ``model`` the server answered with ``status``."""
    metrics = server.running.registry.metrics
    return metrics.counter("sie_requests_total", model=model, endpoint="encode", status=status)


def state(server: ServerHandle, model: str) -> str:
    value: str = server.running.registry.entry(model).state.value
    return value


async def counted(condition: Callable[[], bool], what: str) -> None:
    """The server counts a call just after answering it, so a client may see the answer first."""
    await eventually(condition, what)


# ---- a loading model ---------------------------------------------------------------------------


async def test_a_loading_model_is_retried_until_it_answers(sdk: Sdk, server: ServerHandle) -> None:
    name = lazy(sdk.case)
    assert state(server, name) != "loaded"
    texts = ["first call", "loads the model"]
    results = await asyncio.wait_for(
        sdk("encode", name, [Item(text=t) for t in texts]), 2 * HANG_GUARD_S
    )
    assert answered(server, name, "MODEL_LOADING") >= 1, "the first call found it loading"
    await counted(lambda: answered(server, name, "ok") == 1, "the call that succeeded")
    assert state(server, name) == "loaded"
    for result, text in zip(results, texts, strict=True):
        assert np.array_equal(result["dense"], expected_vector(text))


async def test_no_provision_budget_raises_provisioning_error_after_one_call(
    sdk: Sdk, server: ServerHandle
) -> None:
    name = cold(sdk.case)
    with pytest.raises(ProvisioningError) as caught:
        await sdk("encode", name, Item(text="a"), provision_timeout_s=0)
    error = caught.value
    assert (error.code, error.status_code, error.model) == ("MODEL_LOADING", 503, name)
    assert error.retry_after is not None
    await counted(lambda: answered(server, name, "MODEL_LOADING") >= 1, "the refused call")
    assert answered(server, name, "MODEL_LOADING") == 1, "not retried"


# ---- a full queue ----------------------------------------------------------------------------------


def held_adapter(server: ServerHandle) -> FakeAdapter:
    adapter = server.running.registry.entry(HELD).adapter
    assert isinstance(adapter, FakeAdapter)
    return adapter


def pending(server: ServerHandle) -> int:
    executor = server.running.registry.entry(HELD).executor
    assert executor is not None
    return executor.pending_items


def has_pending(server: ServerHandle, count: int) -> bool:
    return pending(server) == count


async def fill_queue(server: ServerHandle, tag: str) -> list[asyncio.Task[Any]]:
    """With the model held: one call running and one queued, 20 of the 30 tokens admitted."""
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)

    async def one(text: str) -> encode_pb2.EncodeResponse:
        request = encode_pb2.EncodeRequest(model=HELD, items=[common_pb2.Item(text=text)])
        return await stub.Encode(request)

    tasks = []
    for count in (1, 2):
        tasks.append(asyncio.create_task(one(words(f"{tag}{count}"))))
        await eventually(partial(has_pending, server, count), f"{count} calls admitted")
    return tasks


async def refused_call(sdk: Sdk, provision_timeout_s: float) -> ServerError:
    """Two items on the held model (no room in its full queue): the ServerError it ends in."""
    with pytest.raises(ServerError) as caught:
        await asyncio.wait_for(
            sdk(
                "encode",
                HELD,
                [Item(text=words("x")), Item(text=words("y"))],
                provision_timeout_s=provision_timeout_s,
            ),
            HANG_GUARD_S,
        )
    return caught.value


async def test_a_full_queue_is_retried_until_it_drains(sdk: Sdk, server: ServerHandle) -> None:
    adapter = held_adapter(server)
    texts = [words("x"), words("y")]
    refused = answered(server, HELD, "QUEUE_FULL")
    adapter.hold()
    try:
        fillers = await fill_queue(server, f"fill-{sdk.case.id}-")
        call = asyncio.create_task(sdk("encode", HELD, [Item(text=t) for t in texts]))
        await eventually(
            lambda: answered(server, HELD, "QUEUE_FULL") >= refused + 2, "refused and retried"
        )
        assert not call.done()
    finally:
        adapter.release()
    results = await asyncio.wait_for(call, HANG_GUARD_S)
    for result, text in zip(results, texts, strict=True):
        assert np.array_equal(result["dense"], expected_vector(text))
    for filler in fillers:
        reply = await asyncio.wait_for(filler, HANG_GUARD_S)
        assert len(reply.items) == 1


async def test_provision_timeout_bounds_the_wait_for_a_full_queue(
    sdk: Sdk, server: ServerHandle
) -> None:
    adapter = held_adapter(server)
    refused = answered(server, HELD, "QUEUE_FULL")
    adapter.hold()
    try:
        fillers = await fill_queue(server, f"bound-{sdk.case.id}-")
        error = await refused_call(sdk, provision_timeout_s=0.5)
    finally:
        adapter.release()
    assert (error.code, error.status_code, error.model) == ("QUEUE_FULL", 503, HELD)
    await counted(
        lambda: answered(server, HELD, "QUEUE_FULL") - refused >= 2, "retried within the budget"
    )
    for filler in fillers:
        await asyncio.wait_for(filler, HANG_GUARD_S)


async def test_a_call_past_timeout_s_raises_deadline_exceeded_once(
    case: Case, server: ServerHandle, http: BridgeHandle
) -> None:
    adapter = held_adapter(server)
    late = f"late-{case.id}"
    client = make_sdk(case, case.url(grpc_address=server.address, http_url=http.url), timeout_s=0.3)
    adapter.hold()
    try:
        fillers = await fill_queue(server, f"deadline-{case.id}-")
        with pytest.raises(ServerError) as caught:
            await asyncio.wait_for(client("encode", HELD, Item(text=late)), HANG_GUARD_S)
        await eventually(lambda: pending(server) == 2, "the expired call left the queue")
    finally:
        adapter.release()
        await client.close()
    assert (caught.value.code, caught.value.status_code) == ("DEADLINE_EXCEEDED", 504)
    for filler in fillers:
        await asyncio.wait_for(filler, HANG_GUARD_S)
    assert late not in adapter.seen_texts(), "the expired call never reached the model"


# ---- counted calls -----------------------------------------------------------------------------------


class CountingBackend(encode_pb2_grpc.EncodeServiceServicer):
    """``Encode(model="<REASON>/<n>/<tag>")`` fails with REASON (as the server does, with a short
    retry hint) the first n times, then answers one dense vector per item."""

    HINT_S = 0.05

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def Encode(
        self, request: encode_pb2.EncodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> encode_pb2.EncodeResponse:
        seen = self.calls[request.model] = self.calls.get(request.model, 0) + 1
        name, failures, _ = request.model.split("/")
        if seen <= int(failures):
            error = type("Raised", (SIEServerError,), {"reason": name})(
                f"raised {name}", model=request.model, retry_after_s=self.HINT_S
            )
            code, message, trailers = status_for(error)
            await context.abort(code, message, trailing_metadata=trailers)
        vector = np.array([float(seen), 1.0], dtype=np.float32)
        return encode_pb2.EncodeResponse(
            model=request.model,
            items=[
                encode_pb2.EncodeResult(
                    id=f"item-{i}",
                    dense=encode_pb2.DenseVector(
                        dims=2, values=to_tensor(vector, common_pb2.DTYPE_FLOAT32)
                    ),
                    num_tokens=1,
                )
                for i in range(len(request.items))
            ],
        )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def counting() -> AsyncIterator[tuple[CountingBackend, str]]:
    backend = CountingBackend()
    server = grpc.aio.server()
    encode_pb2_grpc.add_EncodeServiceServicer_to_server(backend, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield backend, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def counting_bridge(
    counting: tuple[CountingBackend, str],
) -> AsyncIterator[BridgeHandle]:
    async with bridged(counting[1]) as handle:
        yield handle


@pytest.mark.parametrize(
    ("reason", "failures", "calls"),
    [
        ("QUEUE_FULL", 2, 3),
        ("MODEL_LOADING", 1, 2),
        ("BACKEND_UNAVAILABLE", 1, 2),
        ("INFERENCE_ERROR", 1, 1),
        ("RESOURCE_EXHAUSTED", 1, 1),
        ("MODEL_LOAD_FAILED", 1, 1),
    ],
)
async def test_retried_reasons_cost_exactly_their_calls(
    case: Case,
    counting: tuple[CountingBackend, str],
    counting_bridge: BridgeHandle,
    reason: str,
    failures: int,
    calls: int,
) -> None:
    backend, address = counting
    model = f"{reason}/{failures}/{case.id}"
    client = make_sdk(case, case.url(grpc_address=address, http_url=counting_bridge.url))
    try:
        if calls > failures:
            result = await asyncio.wait_for(client("encode", model, Item(text="a")), HANG_GUARD_S)
            assert np.array_equal(result["dense"], np.array([calls, 1.0], dtype=np.float32))
        else:
            with pytest.raises(SIEError) as caught:
                await asyncio.wait_for(client("encode", model, Item(text="a")), HANG_GUARD_S)
            assert type(caught.value) is error_class(reason)
            assert caught.value.code == reason
    finally:
        await client.close()
    assert backend.calls[model] == calls


# ---- client-side throttling --------------------------------------------------------------------

THROTTLED_CALLS = 60


async def test_a_refusing_model_is_spared_attempts_by_the_clients_throttle(
    sdk: Sdk, server: ServerHandle
) -> None:
    """Against the real server, over both transports: once the held model has refused at least
    ``MIN_REFUSALS`` of this client's attempts, the client holds most of its attempts back
    itself (client/_throttle.py). Each call here makes one attempt (no retry budget), so every
    call is either refused by the server or held by the client, and both end the same way."""
    adapter = held_adapter(server)
    refused = answered(server, HELD, "QUEUE_FULL")
    errors: list[ServerError] = []
    adapter.hold()
    try:
        fillers = await fill_queue(server, f"throttle-{sdk.case.id}-")
        for _ in range(THROTTLED_CALLS):
            errors.append(await refused_call(sdk, provision_timeout_s=0))
    finally:
        adapter.release()
    for filler in fillers:
        assert len((await asyncio.wait_for(filler, HANG_GUARD_S)).items) == 1
    held = [e for e in errors if "client-side throttling" in e.message]
    await counted(
        lambda: answered(server, HELD, "QUEUE_FULL") - refused + len(held) == THROTTLED_CALLS,
        "every call refused by the server or held by the client",
    )
    assert all((e.code, e.status_code, e.model) == ("QUEUE_FULL", 503, HELD) for e in errors)
    assert all(e.retry_after is not None and e.retry_after > 0 for e in errors)
    sent = THROTTLED_CALLS - len(held)
    # Nothing is held before 20 refusals; past them, a call is held with a chance of about
    # (attempts - 2 x accepted) / (attempts + 1), which is over 0.95 here.
    assert sent >= MIN_REFUSALS
    assert not any("client-side throttling" in e.message for e in errors[:MIN_REFUSALS])
    assert len(held) >= (THROTTLED_CALLS - MIN_REFUSALS) // 2, (sent, len(held))
