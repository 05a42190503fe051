"""Domain errors of the engine: raised anywhere in ``sie_server``, translated at the transport.

The tree (every class carries a ``reason`` from ``sie.v1.ErrorReason``, without its prefix)::

    SIEServerError                       INTERNAL_ERROR
    ├── InvalidInput                     INVALID_INPUT
    │   ├── InputTooLong                 INPUT_TOO_LONG
    │   └── ResponseTooLarge             INVALID_INPUT        (says how many items fit)
    ├── ModelNotFound                    MODEL_NOT_FOUND
    ├── ModelNotLoaded                   MODEL_NOT_LOADED     (retryable)
    │   ├── ModelLoading                 MODEL_LOADING        (retryable)
    │   └── LoraLoading                  LORA_LOADING         (retryable)
    ├── ModelLoadFailed                  MODEL_LOAD_FAILED
    │   └── LoraLoadFailed               MODEL_LOAD_FAILED
    ├── QueueFull                        QUEUE_FULL           (retryable)
    ├── ResourceExhausted                RESOURCE_EXHAUSTED   (retryable)
    ├── DeadlineExceeded                 DEADLINE_EXCEEDED
    ├── ShuttingDown                     SHUTTING_DOWN        (retryable)
    ├── InferenceError                   INFERENCE_ERROR
    ├── InternalError                    INTERNAL_ERROR
    └── Unauthenticated                  UNAUTHENTICATED

Each reason's gRPC status, HTTP status and default retry hint live in one table,
``sie_sdk.reasons.REASONS``, which every transport reads.
"""

from __future__ import annotations

from sie_sdk.reasons import ITEMS_THAT_FIT, REASONS

#: The most characters of a client's own text (a model name) that an error repeats back.
ECHO_CHARS = 120


def shortened(text: str, limit: int = ECHO_CHARS) -> str:
    """``text``, or its first ``limit`` characters and its length: what an error repeats of a
    client's input stays small (gRPC clients refuse trailers over 16 KiB)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class SIEServerError(Exception):
    """Base of every error the engine raises on purpose."""

    reason = "INTERNAL_ERROR"
    #: Seconds after which a retry may succeed; None when retrying does not help. Defaults to
    #: the reason's row in ``sie_sdk.reasons.REASONS``.
    retry_after_s: float | None

    def __init__(
        self, message: str, *, model: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else REASONS[self.reason].retry_after_s
        )

    def metadata(self) -> dict[str, str]:
        """What the transports carry besides the message (gRPC ErrorInfo metadata, the HTTP
        error body): the model, and what a subclass adds."""
        return {"model": shortened(self.model)} if self.model else {}


class InvalidInput(SIEServerError):
    reason = "INVALID_INPUT"


class InputTooLong(InvalidInput):
    reason = "INPUT_TOO_LONG"


class ResponseTooLarge(InvalidInput):
    """The response would pass the message limit: refused before any compute, with how many
    items like these fit in one request (the SDK splits by it)."""

    def __init__(self, message: str, *, model: str | None, items_that_fit: int) -> None:
        super().__init__(message, model=model)
        self.items_that_fit = items_that_fit

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), ITEMS_THAT_FIT: str(self.items_that_fit)}


class ModelNotFound(SIEServerError):
    reason = "MODEL_NOT_FOUND"


class ModelNotLoaded(SIEServerError):
    reason = "MODEL_NOT_LOADED"


class ModelLoading(ModelNotLoaded):
    reason = "MODEL_LOADING"


class LoraLoading(ModelNotLoaded):
    """The model is loaded, the request's LoRA adapter is not yet (its load has started);
    ``lora`` names it (the SDK's ``LoraLoadingError.lora``)."""

    reason = "LORA_LOADING"

    def __init__(
        self,
        message: str,
        *,
        lora: str,
        model: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, model=model, retry_after_s=retry_after_s)
        self.lora = lora

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "lora": self.lora}


class ModelLoadFailed(SIEServerError):
    reason = "MODEL_LOAD_FAILED"


class LoraLoadFailed(ModelLoadFailed):
    """The request's LoRA adapter failed to load (the message names it and says why)."""


class QueueFull(SIEServerError):
    reason = "QUEUE_FULL"


class ResourceExhausted(SIEServerError):
    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(SIEServerError):
    reason = "DEADLINE_EXCEEDED"


class ShuttingDown(SIEServerError):
    reason = "SHUTTING_DOWN"


class InferenceError(SIEServerError):
    reason = "INFERENCE_ERROR"


class InternalError(SIEServerError):
    reason = "INTERNAL_ERROR"


class Unauthenticated(SIEServerError):
    reason = "UNAUTHENTICATED"
