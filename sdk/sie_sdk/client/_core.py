"""The client core: everything ``SIEClient`` and ``SIEAsyncClient`` share, written once.

For each method the core validates the arguments, builds the request bodies (in the HTTP API's
shape; the gRPC transport converts them with ``sie_sdk.convert``), and returns a ``Prepared``
call: the operation, the bodies (one per chunk when a request has more items than
``max_items_per_request``), and the function that turns the responses into the reference's result
types. The two clients only send the bodies (with the retry policy of ``_retry``) and call
``parse``: their methods are a line each.

Choosing the transport: ``transport="http"`` or ``"grpc"``; by default the URL decides
(``http(s)://`` means HTTP through the bridge, ``grpc(s)://`` or a bare ``host:port`` (list)
means gRPC to the server).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from sie_sdk.client._retry import RetryPolicy
from sie_sdk.client._stream import StreamState
from sie_sdk.client._throttle import DEFAULT_RATIO, Throttle
from sie_sdk.client._transports.base import CallOptions, Kind, Operation
from sie_sdk.client.errors import PoolError, RequestError, SIEError
from sie_sdk.inputs import InputError, prepare_item
from sie_sdk.reasons import ITEMS_THAT_FIT
from sie_sdk.types import (
    CapacityInfo,
    EncodeResult,
    ExtractResult,
    Item,
    ModelInfo,
    ScoreEntry,
    ScoreResult,
    TimingInfo,
)

R = TypeVar("R")
TransportName = Literal["http", "grpc"]
DEFAULT_MAX_ITEMS_PER_REQUEST = 1024
DEFAULT_PROVISION_TIMEOUT_S = 300.0


def choose_transport(base_url: str, transport: str | None) -> TransportName:
    if transport is not None:
        if transport not in ("http", "grpc"):
            raise ValueError(f"transport must be 'http' or 'grpc', got {transport!r}")
        return "http" if transport == "http" else "grpc"
    if base_url.startswith(("http://", "https://")):
        return "http"
    return "grpc"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    base_url: str
    timeout_s: float = 30.0
    api_key: str | None = None
    gpu: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    transport: TransportName = "http"
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST
    #: How many chunks of one split request are in flight at once.
    max_concurrency: int = 4
    #: Client-side throttling under overload: attempts sent per call the server accepts while
    #: it refuses most (``sie_sdk.client._throttle``); 0 turns it off.
    throttle_ratio: float = DEFAULT_RATIO


@dataclass(frozen=True, slots=True)
class Prepared(Generic[R]):
    op: Operation
    bodies: list[dict[str, Any] | None]
    parse: Callable[[list[Any]], R]
    provision_timeout_s: float
    gpu: str | None = None
    #: Whether an unreachable server is waited for the whole provision_timeout_s (True), or
    #: only for CONNECT_RETRY_S (a restart) before SIEConnectionError.
    wait_for_capacity: bool = False


def no_pools(name: str) -> PoolError:
    return PoolError(
        f"resource pool {name!r}: a standalone SIE server has no pools (a cluster feature)",
        pool_name=name,
    )


def closed_error() -> SIEError:
    return SIEError("the client is closed", code="CLIENT_CLOSED")


def _chunks(items: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """``items`` in chunks of ``size``. When it splits, items without an id get the one the
    server would give them unsplit (``item-<index>``), so results stay distinguishable."""
    if len(items) > size:
        items = [
            item if "id" in item else {**item, "id": f"item-{i}"} for i, item in enumerate(items)
        ]
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


#: The operations whose results are one per item, in order, so that their items can go in
#: several requests and the responses be read one after the other.
_SPLITTABLE = (Kind.ENCODE, Kind.EXTRACT)


def smaller_bodies(
    prepared: Prepared[Any], body: dict[str, Any] | None, error: SIEError
) -> list[dict[str, Any]] | None:
    """``body``'s items in smaller requests, when the server refused it for its size and
    smaller requests can pass: an encode whose response would pass the message limit goes in
    requests of as many items as the server says fit (``ITEMS_THAT_FIT``); a request over the
    request size limit (``REQUEST_TOO_LARGE``) goes in halves. None for any other refusal, or
    one item. Each split has fewer items than the request, so splitting again ends."""
    if prepared.op.kind not in _SPLITTABLE or body is None:
        return None
    items = body["items"]
    if error.code == "REQUEST_TOO_LARGE":
        size = (len(items) + 1) // 2
    elif error.code == "INVALID_INPUT" and ITEMS_THAT_FIT in error.details:
        try:
            size = int(error.details[ITEMS_THAT_FIT])
        except ValueError:
            return None
    else:
        return None
    if not 1 <= size < len(items):
        return None
    return [{**body, "items": chunk} for chunk in _chunks(items, size)]


def _array_result(item: Mapping[str, Any], timing: Mapping[str, float] | None) -> EncodeResult:
    result: EncodeResult = {}
    if "id" in item:
        result["id"] = item["id"]
    if item.get("dense") is not None:
        result["dense"] = item["dense"]["values"]
    if item.get("sparse") is not None:
        sparse = item["sparse"]
        result["sparse"] = {"indices": sparse["indices"], "values": sparse["values"]}
    if item.get("multivector") is not None:
        result["multivector"] = item["multivector"]["values"]
    if "num_tokens" in item:
        result["num_tokens"] = int(item["num_tokens"])
    if "truncated" in item:
        result["truncated"] = bool(item["truncated"])
    if timing is not None:
        result["timing"] = TimingInfo(**timing)  # type: ignore[typeddict-item]
    return result


def _extract_result(item: Mapping[str, Any]) -> ExtractResult:
    result: ExtractResult = {
        "entities": list(item.get("entities", [])),
        "relations": list(item.get("relations", [])),
        "classifications": list(item.get("classifications", [])),
        "objects": list(item.get("objects", [])),
    }
    if item.get("id") is not None:
        result["id"] = item["id"]
    if item.get("data"):
        result["data"] = item["data"]
    return result


class ClientCore:
    """Request building and response parsing for both clients and both transports."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config

    # ---- shared pieces -------------------------------------------------------------------------
    def _options(self, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        merged = {**self.config.options, **(options or {})}
        return merged or None

    def _route(self, gpu: str | None) -> str | None:
        """Cluster GPU routing does not exist on a standalone server: say so clearly."""
        gpu = gpu if gpu is not None else self.config.gpu
        if gpu is None:
            return None
        if "/" in gpu:
            raise PoolError(
                f"gpu={gpu!r} routes to a resource pool; a standalone SIE server has no pools",
                pool_name=gpu.split("/", 1)[0],
            )
        raise SIEError(
            f"gpu={gpu!r}: a standalone SIE server serves on its one device and routes nothing "
            "by GPU type; leave gpu unset (GPU routing is a cluster feature)",
            code="GPU_ROUTING_UNSUPPORTED",
        )

    def _provision(self, provision_timeout_s: float | None) -> float:
        return DEFAULT_PROVISION_TIMEOUT_S if provision_timeout_s is None else provision_timeout_s

    def _items(self, items: Item | Sequence[Item]) -> tuple[list[dict[str, Any]], bool]:
        single = isinstance(items, Mapping)
        listed = [items] if single else list(items)
        prepared = []
        for index, item in enumerate(listed):
            if not isinstance(item, Mapping):
                raise RequestError(
                    f"items[{index}] must be an Item (a dict), got {type(item).__name__}",
                    code="INVALID_INPUT",
                    status_code=400,
                )
            try:
                prepared.append(prepare_item(item, where=f"items[{index}]"))
            except InputError as exc:
                raise RequestError(str(exc), code="INVALID_INPUT", status_code=400) from exc
        return prepared, single

    # ---- tasks -------------------------------------------------------------------------------------
    def encode(
        self,
        model: str,
        items: Item | Sequence[Item],
        *,
        output_types: Sequence[str] | None = None,
        instruction: str | None = None,
        output_dtype: str | None = None,
        is_query: bool | None = None,
        options: Mapping[str, Any] | None = None,
        gpu: str | None = None,
        wait_for_capacity: bool = False,
        provision_timeout_s: float | None = None,
    ) -> Prepared[EncodeResult | list[EncodeResult]]:
        route = self._route(gpu)
        prepared, single = self._items(items)
        params: dict[str, Any] = {}
        if output_types is not None:
            params["output_types"] = list(output_types)
        if instruction is not None:
            params["instruction"] = instruction
        if output_dtype is not None:
            params["output_dtype"] = output_dtype
        if is_query is not None:
            params["is_query"] = is_query
        if (merged := self._options(options)) is not None:
            params["options"] = merged
        bodies: list[dict[str, Any] | None] = [
            {"items": chunk, **({"params": params} if params else {})}
            for chunk in _chunks(prepared, self.config.max_items_per_request)
        ]

        def parse(responses: list[Any]) -> EncodeResult | list[EncodeResult]:
            results = [
                _array_result(item, r.get("timing")) for r in responses for item in r["items"]
            ]
            return results[0] if single else results

        return Prepared(
            Operation(Kind.ENCODE, model),
            bodies,
            parse,
            self._provision(provision_timeout_s),
            route,
            wait_for_capacity,
        )

    def encode_stream(
        self,
        model: str,
        items: Iterable[Item] | AsyncIterable[Item],
        batch_size: int,
        window: int,
        **kwargs: Any,
    ) -> StreamState:
        """The state of one ``encode_stream``: batches built by ``encode`` (with ``kwargs``),
        read lazily from ``items``; either transport streams them (``_stream``)."""
        if batch_size > self.config.max_items_per_request:
            raise ValueError(
                f"batch_size {batch_size} is over max_items_per_request "
                f"{self.config.max_items_per_request}"
            )
        self._route(kwargs.get("gpu"))
        budget = self._provision(kwargs.get("provision_timeout_s"))
        wait = bool(kwargs.get("wait_for_capacity", False))

        def build(chunk: list[Item]) -> tuple[Mapping[str, Any], Callable[[list[Any]], Any]]:
            prepared = self.encode(model, chunk, **kwargs)
            body = prepared.bodies[0]
            assert body is not None
            return body, prepared.parse

        return StreamState(items, build, batch_size, window, lambda: RetryPolicy(budget, wait))

    def score(
        self,
        model: str,
        query: Item,
        items: Sequence[Item],
        *,
        instruction: str | None = None,
        options: Mapping[str, Any] | None = None,
        gpu: str | None = None,
        wait_for_capacity: bool = False,
        provision_timeout_s: float | None = None,
    ) -> Prepared[ScoreResult]:
        route = self._route(gpu)
        if not isinstance(query, Mapping):
            raise RequestError(
                "query must be an Item (a dict)", code="INVALID_INPUT", status_code=400
            )
        [query_item], _ = self._items(query)
        prepared, _ = self._items(list(items))
        extra: dict[str, Any] = {}
        if instruction is not None:
            extra["instruction"] = instruction
        if (merged := self._options(options)) is not None:
            extra["options"] = merged
        size = self.config.max_items_per_request
        chunks = _chunks(prepared, size)
        bodies: list[dict[str, Any] | None] = [
            {"query": query_item, "items": chunk, **extra} for chunk in chunks
        ]

        def parse(responses: list[Any]) -> ScoreResult:
            entries: list[tuple[float, int, str]] = []
            for chunk_index, response in enumerate(responses):
                for entry in response["scores"]:
                    # Rank within the chunk orders ties; the chunk offset keeps them stable.
                    order = chunk_index * size + int(entry["rank"])
                    entries.append((float(entry["score"]), order, str(entry["item_id"])))
            entries.sort(key=lambda e: (-e[0], e[1]))
            scores = [
                ScoreEntry(item_id=item_id, score=score, rank=rank)
                for rank, (score, _, item_id) in enumerate(entries)
            ]
            result: ScoreResult = {"model": responses[0]["model"], "scores": scores}
            if responses[0].get("query_id"):
                result["query_id"] = responses[0]["query_id"]
            return result

        return Prepared(
            Operation(Kind.SCORE, model),
            bodies,
            parse,
            self._provision(provision_timeout_s),
            route,
            wait_for_capacity,
        )

    def extract(
        self,
        model: str,
        items: Item | Sequence[Item],
        *,
        labels: Sequence[str] | None = None,
        output_schema: Mapping[str, Any] | None = None,
        instruction: str | None = None,
        options: Mapping[str, Any] | None = None,
        gpu: str | None = None,
        wait_for_capacity: bool = False,
        provision_timeout_s: float | None = None,
    ) -> Prepared[ExtractResult | list[ExtractResult]]:
        route = self._route(gpu)
        prepared, single = self._items(items)
        params: dict[str, Any] = {}
        if labels is not None:
            params["labels"] = list(labels)
        if output_schema is not None:
            params["output_schema"] = dict(output_schema)
        if instruction is not None:
            params["instruction"] = instruction
        if (merged := self._options(options)) is not None:
            params["options"] = merged
        bodies: list[dict[str, Any] | None] = [
            {"items": chunk, **({"params": params} if params else {})}
            for chunk in _chunks(prepared, self.config.max_items_per_request)
        ]

        def parse(responses: list[Any]) -> ExtractResult | list[ExtractResult]:
            results = [_extract_result(item) for r in responses for item in r["items"]]
            return results[0] if single else results

        return Prepared(
            Operation(Kind.EXTRACT, model),
            bodies,
            parse,
            self._provision(provision_timeout_s),
            route,
            wait_for_capacity,
        )

    # ---- models and capacity -------------------------------------------------------------------
    def list_models(self) -> Prepared[list[ModelInfo]]:
        return Prepared(
            Operation(Kind.LIST_MODELS),
            [None],
            lambda responses: [ModelInfo(**m) for m in responses[0]["models"]],  # type: ignore[typeddict-item]
            0.0,
        )

    def get_model(self, model: str) -> Prepared[ModelInfo]:
        return Prepared(
            Operation(Kind.GET_MODEL, model),
            [None],
            lambda responses: ModelInfo(**responses[0]),  # type: ignore[typeddict-item]
            0.0,
        )

    @staticmethod
    def capacity(ready: bool, status: Mapping[str, Any] | None) -> CapacityInfo:
        """What a standalone server has, from its readiness and one status message."""
        info: CapacityInfo = {"ready": ready, "loaded_models": [], "models": []}
        if status is None or "models" not in status:
            return info
        info["gpu"] = str(status.get("gpu", ""))
        info["loaded_models"] = list(status.get("loaded_models", []))
        devices = {m.get("device") for m in status["models"] if m.get("device")}
        info["device"] = devices.pop() if len(devices) == 1 else str(status.get("gpu", ""))
        info["models"] = [
            {
                key: m.get(key)
                for key in ("name", "state", "queue_depth", "queue_pending_items", "memory_bytes")
            }
            for m in status["models"]
        ]
        return info


T = TypeVar("T")


class ClientBase(Generic[T]):
    """The constructor both clients share (the reference's signature plus the transport switch);
    a subclass opens its transport (``T``: sync or async) in ``_open``."""

    config: ClientConfig
    _core: ClientCore
    _transport: T
    _call: CallOptions
    _throttle: Throttle
    _closed: bool = False

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 30.0,
        api_key: str | None = None,
        gpu: str | None = None,
        options: Mapping[str, Any] | None = None,
        pool: Any = None,
        *,
        transport: str | None = None,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        max_concurrency: int = 4,
        throttle_ratio: float = DEFAULT_RATIO,
    ) -> None:
        if pool is not None:
            raise no_pools(str(pool))
        if max_items_per_request < 1 or max_concurrency < 1:
            raise ValueError("max_items_per_request and max_concurrency must be at least 1")
        if throttle_ratio != 0 and throttle_ratio < 1:
            raise ValueError("throttle_ratio must be 0 (off) or at least 1")
        self.config = ClientConfig(
            base_url=base_url,
            timeout_s=timeout_s,
            api_key=api_key,
            gpu=gpu,
            options=dict(options or {}),
            transport=choose_transport(base_url, transport),
            max_items_per_request=max_items_per_request,
            max_concurrency=max_concurrency,
            throttle_ratio=throttle_ratio,
        )
        self._core = ClientCore(self.config)
        self._call = CallOptions(timeout_s, api_key)
        self._throttle = Throttle(self.config.throttle_ratio)
        self._transport = self._open(self.config)

    def _open(self, config: ClientConfig) -> T:
        raise NotImplementedError
