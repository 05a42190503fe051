"""What a call is, independent of the transport: an ``Operation`` and a body in the HTTP API's
shape. Both transports answer with the response in that same shape, vectors as numpy arrays
viewing the received bytes, so the client core parses one shape whatever carried it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote


class Kind(enum.Enum):
    ENCODE = "encode"
    SCORE = "score"
    EXTRACT = "extract"
    LIST_MODELS = "list_models"
    GET_MODEL = "get_model"


@dataclass(frozen=True, slots=True)
class Operation:
    kind: Kind
    model: str = ""

    @property
    def http_method(self) -> str:
        return "GET" if self.kind in (Kind.LIST_MODELS, Kind.GET_MODEL) else "POST"

    @property
    def http_path(self) -> str:
        model = quote(self.model, safe="/:")
        if self.kind is Kind.LIST_MODELS:
            return "/v1/models"
        if self.kind is Kind.GET_MODEL:
            return f"/v1/models/{model}"
        return f"/v1/{self.kind.value}/{model}"


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Per call: the deadline and the metadata every call carries."""

    timeout_s: float
    api_key: str | None = None


class Transport(Protocol):
    def send(self, op: Operation, body: Mapping[str, Any] | None, call: CallOptions) -> Any: ...

    def ready(self, call: CallOptions) -> bool: ...

    def watch_status(self, interval_ms: int, call: CallOptions) -> Iterator[dict[str, Any]]: ...

    def encode_stream(
        self,
        model: str,
        batches: Iterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    async def send(
        self, op: Operation, body: Mapping[str, Any] | None, call: CallOptions
    ) -> Any: ...

    async def ready(self, call: CallOptions) -> bool: ...

    def watch_status(
        self, interval_ms: int, call: CallOptions
    ) -> AsyncIterator[dict[str, Any]]: ...

    def encode_stream(
        self,
        model: str,
        batches: AsyncIterator[tuple[int, Mapping[str, Any]]],
        window: int,
        call: CallOptions,
    ) -> AsyncIterator[tuple[int, Any]]: ...

    async def close(self) -> None: ...
