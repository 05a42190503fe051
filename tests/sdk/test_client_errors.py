"""The SDK's errors, the same over both transports and both clients: every reason of the table
through a backend that answers it exactly as the server does (gRPC directly, HTTP through the
bridge), a refused connection, a real input-too-long overflow, the reference's error-handling
example, GPU routing and resource pools on a standalone server, and the one reason table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sie_bridge.errors import error_response
from sie_sdk import Item, SIEAsyncClient, SIEClient
from sie_sdk.client import errors
from sie_sdk.client.errors import (
    InputTooLongError,
    PoolError,
    RequestError,
    ServerError,
    SIEConnectionError,
    SIEError,
    error_class,
)
from sie_sdk.reasons import REASONS, ErrorDetail, reason_names
from sie_sdk.v1 import common_pb2, encode_pb2_grpc
from sie_server.errors import SIEServerError
from sie_server.grpc_api.errors import status_for

from tests.bridge.test_errors import ReasonBackend
from tests.bridge_utils import BridgeHandle, bridged
from tests.sdk.conftest import CASES, Case, Sdk, make_sdk
from tests.server_utils import HANG_GUARD_S, ServerHandle, free_port, serving, write_catalog_entry
from tests.tiny_models import classifiers, gliclass
from tests.tiny_models.entries import JSON_OUTPUTS, entry

pytestmark = pytest.mark.filterwarnings(classifiers.DEBERTA_JIT_WARNING)

GLICLASS = "knowledgator/gliclass-small-v1.0"
#: Short enough that the reasons the SDK retries give up quickly.
PROVISION_S = 0.2


# ---- a backend answering every reason ----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def reason_backend() -> AsyncIterator[str]:
    server = grpc.aio.server()
    encode_pb2_grpc.add_EncodeServiceServicer_to_server(ReasonBackend(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def reason_bridge(reason_backend: str) -> AsyncIterator[BridgeHandle]:
    async with bridged(reason_backend) as handle:
        yield handle


Outcome = tuple[type[SIEError], str | None, int | None, str | None, str, bool]


async def outcomes(client: Sdk) -> dict[str, Outcome]:
    """What a call answered with each reason raises: (class, code, status, model, message,
    whether a retry hint came with it)."""
    seen: dict[str, Outcome] = {}
    for name in reason_names():
        with pytest.raises(SIEError) as caught:
            await client(
                "encode", f"reason/{name}", Item(text="a"), provision_timeout_s=PROVISION_S
            )
        error = caught.value
        seen[name] = (
            type(error),
            error.code,
            error.status_code,
            error.model,
            str(error),
            error.retry_after is not None,
        )
    return seen


async def test_every_reason_raises_its_class_identically_on_every_client(
    reason_backend: str, reason_bridge: BridgeHandle
) -> None:
    want = {
        name: (
            getattr(errors, row.sdk_error),
            name,
            row.http_status,
            f"reason/{name}",
            f"raised {name}",
            row.retry_after_s is not None,
        )
        for name, row in REASONS.items()
    }
    for case in CASES:
        client = make_sdk(case, case.url(grpc_address=reason_backend, http_url=reason_bridge.url))
        try:
            assert await outcomes(client) == want, case.id
        finally:
            await client.close()


async def test_reason_specific_attributes(reason_backend: str, reason_bridge: BridgeHandle) -> None:
    for case in CASES:
        client = make_sdk(case, case.url(grpc_address=reason_backend, http_url=reason_bridge.url))
        try:
            with pytest.raises(errors.ProvisioningError) as loading:
                await client(
                    "encode", "reason/MODEL_LOADING", Item(text="a"), provision_timeout_s=0
                )
            assert loading.value.gpu is None
            assert loading.value.retry_after is not None
            assert loading.value.retry_after >= 1.0
            with pytest.raises(errors.LoraLoadingError) as lora:
                await client("encode", "reason/LORA_LOADING", Item(text="a"), provision_timeout_s=0)
            assert lora.value.lora == ""
            assert lora.value.model == "reason/LORA_LOADING"
        finally:
            await client.close()


# ---- a real server: overflow, the reference's example, routing, pools --------------------------


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdk-errors")
    weights = gliclass.build_tiny_gliclass(root / "gliclass")
    item = entry(GLICLASS, "gliclass", weights, JSON_OUTPUTS, max_sequence_length=64)
    write_catalog_entry(root / "catalog", item)
    return root / "catalog"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=[GLICLASS]) as handle:
        yield handle


async def test_input_too_long_from_a_real_overflow(sdk: Sdk) -> None:
    long_text = " ".join(["battery"] * 200)
    labels = ["positive", "negative", "neutral"]
    with pytest.raises(InputTooLongError) as caught:
        await sdk(
            "extract",
            GLICLASS,
            Item(text=long_text),
            labels=labels,
            options={"overflow_policy": "error"},
        )
    error = caught.value
    assert isinstance(error, RequestError), "existing 4xx handlers still catch it"
    assert (error.code, error.status_code, error.model) == ("INPUT_TOO_LONG", 400, GLICLASS)
    assert f"exceeds context cap 64 for {GLICLASS}" in str(error)
    # The reference's remedy: truncate server-side instead.
    result = await sdk(
        "extract",
        GLICLASS,
        Item(text=long_text),
        labels=labels,
        options={"overflow_policy": "truncate_text"},
    )
    assert sorted(c["label"] for c in result["classifications"]) == sorted(labels)


async def test_the_references_error_handling_example(sdk: Sdk) -> None:
    handled = ""
    try:
        await sdk("encode", "unknown-model", Item(text="test"))
    except InputTooLongError as e:
        handled = f"Input too long for {e.model}: {e}"
    except RequestError as e:
        handled = f"Invalid request: {e.code} ({e.status_code})"
    except errors.ProvisioningError as e:
        handled = f"No capacity for GPU {e.gpu}, retry after {e.retry_after}s"
    assert handled == "Invalid request: MODEL_NOT_FOUND (404)"


async def test_invalid_input_is_a_request_error(sdk: Sdk) -> None:
    with pytest.raises(RequestError) as caught:
        await sdk("extract", GLICLASS, Item(text="a"), labels=[], provision_timeout_s=0)
    assert (caught.value.code, caught.value.status_code) == ("INVALID_INPUT", 400)
    assert caught.value.model == GLICLASS


def requests_seen(server: ServerHandle) -> int:
    metrics = server.running.registry.metrics
    return sum(value for name, _, value in metrics.counters() if name == "sie_requests_total")


async def test_gpu_routing_is_refused_clearly(
    case: Case, sdk: Sdk, server: ServerHandle, http: BridgeHandle
) -> None:
    before = requests_seen(server)
    with pytest.raises(SIEError) as caught:
        await sdk("extract", GLICLASS, [Item(text="a")], labels=["x"], gpu="l4")
    error = caught.value
    assert type(error) is SIEError
    assert error.code == "GPU_ROUTING_UNSUPPORTED"
    assert "gpu='l4'" in str(error)
    assert "standalone" in str(error)
    for method, args in (
        ("get_capacity", {"gpu": "a100-80gb"}),
        ("wait_for_capacity", {"gpu": "l4"}),
    ):
        with pytest.raises(SIEError, match="GPU routing is a cluster feature"):
            await sdk(method, **args)
    routed = make_sdk(case, case.url(grpc_address=server.address, http_url=http.url), gpu="l4")
    try:
        with pytest.raises(SIEError) as caught:
            await routed("encode", GLICLASS, Item(text="a"))
        assert caught.value.code == "GPU_ROUTING_UNSUPPORTED"
    finally:
        await routed.close()
    assert requests_seen(server) == before, "nothing was sent"


async def test_resource_pools_raise_pool_error(case: Case, sdk: Sdk) -> None:
    with pytest.raises(PoolError) as caught:
        await sdk("encode", GLICLASS, [Item(text="a")], gpu="my-test-pool/l4")
    assert caught.value.pool_name == "my-test-pool"
    assert caught.value.state == "unsupported"
    assert "no pools" in str(caught.value)
    with pytest.raises(PoolError) as caught:
        await sdk("create_pool", "my-test-pool", {"l4": 2, "a100-40gb": 1})
    assert caught.value.pool_name == "my-test-pool"
    for method in ("get_pool", "delete_pool"):
        with pytest.raises(PoolError):
            await sdk(method, "my-test-pool")
    cls = SIEAsyncClient if case.flavor == "async" else SIEClient
    with pytest.raises(PoolError):
        cls("http://127.0.0.1:1", pool={"name": "old-style"})


# ---- nothing listening ----------------------------------------------------------------------------


async def test_a_refused_connection_raises_connection_error(case: Case) -> None:
    port = free_port()
    client = make_sdk(
        case, case.url(grpc_address=f"127.0.0.1:{port}", http_url=f"http://127.0.0.1:{port}")
    )
    try:
        for method, args, kwargs in (
            ("encode", ("any/model", Item(text="a")), {"provision_timeout_s": PROVISION_S}),
            ("list_models", (), {}),
        ):
            with pytest.raises(SIEConnectionError) as caught:
                await asyncio.wait_for(client(method, *args, **kwargs), HANG_GUARD_S)
            assert (caught.value.code, caught.value.status_code) == ("BACKEND_UNAVAILABLE", 503)
        capacity = await client("get_capacity")
        assert capacity["ready"] is False
    finally:
        await client.close()


# ---- the one table --------------------------------------------------------------------------------


def test_every_reason_has_exactly_one_row_on_every_transport() -> None:
    names = reason_names()
    assert len(names) == len(set(names))
    assert set(REASONS) == set(names), "one REASONS row per ErrorReason"
    assert set(common_pb2.ErrorReason.keys()) == {
        "ERROR_REASON_UNSPECIFIED",
        *(f"ERROR_REASON_{name}" for name in names),
    }
    for name in names:
        row = REASONS[name]
        assert row.name == name
        # gRPC: the server answers the row's code.
        raised = type("Raised", (SIEServerError,), {"reason": name})("m", model="x")
        code, _, _ = status_for(raised)
        assert isinstance(row.grpc_code, grpc.StatusCode)
        assert code is row.grpc_code, name
        # HTTP: the bridge answers the row's status.
        assert 400 <= row.http_status < 600
        assert error_response(ErrorDetail(name, "m")).status == row.http_status, name
        # SDK: the row names a class of sie_sdk.client.errors, and a 4xx is a RequestError.
        cls = getattr(errors, row.sdk_error)
        assert isinstance(cls, type), name
        assert issubclass(cls, SIEError), name
        assert error_class(name) is cls
        assert issubclass(cls, RequestError) == (row.http_status < 500), name
        if issubclass(cls, ServerError):
            assert row.http_status >= 500
        if row.sdk_retries:
            assert row.retry_after_s is not None, f"{name}: retried without a hint"
