"""What a client may send and what an error says: the error body, the request schemas, the
in-band refusal/failure results model servers return instead of raising, and the names a
caller addresses (API prefix, route header, deployment names).

Shared by the ingress, the replicas and the Python client, so it imports neither Ray Serve nor
torch: `import serve.client` stays light.

Every non-2xx answer of the API has one JSON shape:

    {"error_code": "422_0001", "error_message": ..., "error_details": {"field": ..., "message": ...},
     "request_id": ..., "timestamp": ...}
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

API_PREFIX = "/api/v1"
ROUTE_HEADER = "x-temper-route"
"""Request header naming a route explicitly (e.g. `staging`): bypasses the split (canary checks, blue-green)."""


def model_deployment_name(model: str, route: str | None = None) -> str:
    """Serve deployment name of a model's route: `model-<name>` for its first (primary) route,
    `model-<name>--<ref>` for the others (for `serve.get_deployment_handle`)."""
    return f"model-{model}" if route is None else f"model-{model}--{route}"


ERROR_CODES = {
    400: "400_0001", 401: "401_0001", 403: "403_0001", 404: "404_0001", 409: "409_0001",
    413: "413_0001", 422: "422_0001", 429: "429_0001", 500: "500_0001", 503: "500_0002", 504: "500_0003",
}
"""HTTP status -> error code of the error body (5xx codes are `500_<n>`: 500_0002 unavailable, 500_0003 timeout)."""


def error_code(status: int) -> str:
    return ERROR_CODES.get(status, "400_0001" if status < 500 else "500_0001")


def error_body(status: int, message: str, request_id: str, field: str | None = None, detail: str | None = None) -> dict:
    return {
        "error_code": error_code(status),
        "error_message": message,
        "error_details": {"field": field, "message": detail or message},
        "request_id": request_id,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


class APIError(Exception):
    """An error the ingress answers with the JSON error body (and optional extra headers)."""

    def __init__(self, status: int, message: str, field: str | None = None, detail: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.detail = status, message, field, detail or message
        self.headers = headers or {}


class ModelRequestError(Exception):
    """A request a model server refuses (wrong shape, wrong task, over a cap): a 4xx.

    The server's entry points return it as `{"refused": {...}}` (see `as_refusal`) rather than
    raising, so client mistakes do not fill replica logs with "Request failed" tracebacks;
    callers turn that back into this exception with `raise_if_refused`.
    """

    def __init__(self, status: int, field: str, message: str):
        super().__init__(status, field, message)
        self.status, self.field, self.message = status, field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def as_refusal(self) -> dict:
        return {"refused": {"status": self.status, "field": self.field, "message": self.message}}


class ModelServerError(Exception):
    """A request the model failed on (e.g. non-finite outputs of a broken version): a 5xx.

    Returned in-band as `{"failed": {...}}` so the caller learns which version failed (the
    rollout watcher attributes errors to versions).
    """

    def __init__(self, status: int, message: str, version: int | None = None, backend: str | None = None):
        super().__init__(status, message, version, backend)
        self.status, self.message, self.version, self.backend = status, message, version, backend

    def __str__(self) -> str:
        return self.message

    def as_failure(self) -> dict:
        return {"failed": {"status": self.status, "message": self.message, "version": self.version, "backend": self.backend}}


def raise_if_refused(result: Any) -> Any:
    """A server entry point's result, or ModelRequestError / ModelServerError when it refused or failed."""
    if isinstance(result, dict):
        refused = result.get("refused")
        if refused is not None:
            raise ModelRequestError(refused["status"], refused["field"], refused["message"])
        failed = result.get("failed")
        if failed is not None:
            raise ModelServerError(failed["status"], failed["message"], failed.get("version"), failed.get("backend"))
    return result


# ============================================================================ request schemas


def _check_image(value: Any) -> list:
    """One image: a flat list of numbers, or a rectangular list of lists of numbers."""

    def is_num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(value, list) or not value:
        raise ValueError("an image must be a non-empty list of numbers or of rows of numbers")
    if all(is_num(x) for x in value):
        return [float(x) for x in value]
    if all(isinstance(row, list) for row in value):
        width = len(value[0])
        for i, row in enumerate(value):
            if len(row) != width or not row:
                raise ValueError(f"row {i} has {len(row)} values, row 0 has {width}: rows must be of one length")
            if not all(is_num(x) for x in row):
                raise ValueError(f"row {i} holds a value that is not a number")
        return [[float(x) for x in row] for row in value]
    raise ValueError("an image must be a list of numbers or a list of rows of numbers, not a mix")


Image = Annotated[Any, AfterValidator(_check_image)]

MAX_ITEMS = 1024
"""Schema cap on images / texts per request; `serve.max_items_per_request` (<= this) answers 413 below it."""


class APIRequest(BaseModel):
    """Request bodies: unknown keys are errors; JSON types are taken strictly (no "3" for 3)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(APIRequest):
    inputs: list[Image] = Field(min_length=1, max_length=MAX_ITEMS)
    """Images: each a flat list of C*H*W floats (64 for digits) or H rows of W floats (8x8)."""
    top_k: int = Field(3, ge=1, le=100)
    """Classes (with probabilities) returned per image."""


class ScoreRequest(APIRequest):
    texts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=MAX_ITEMS)
    """Texts to score: for the built-in GPT UTF-8 bytes, at most its block_size each; for an hf
    causal LM its tokenizer's tokens, at most its token limit (data.max_length) each."""
    top_k: int = Field(5, ge=1, le=256)
    """Most likely next tokens (bytes for the built-in GPT) returned per text."""


def _check_text(value: str) -> str:
    if not value.strip():
        raise ValueError("a text must hold something besides whitespace")
    return value


Text = Annotated[str, AfterValidator(_check_text)]


class EmbedRequest(APIRequest):
    texts: list[Text] = Field(min_length=1, max_length=MAX_ITEMS)
    """Texts to embed (an hf embedding model), each at most the model's token limit."""
    truncate: bool = False
    """Cut a text over the token limit to the limit instead of answering 422."""


class ClassifyTextsRequest(APIRequest):
    texts: list[Text] = Field(min_length=1, max_length=MAX_ITEMS)
    """Texts to classify (an hf sequence_classification model), each at most the model's token limit."""
    top_k: int = Field(1, ge=1, le=100)
    """Labels (with probabilities) returned per text, most likely first."""
    truncate: bool = False
    """Cut a text over the token limit to the limit instead of answering 422."""


class GenerateRequest(APIRequest):
    prompt: str = Field(min_length=1)
    """Prompt text (UTF-8). The built-in GPT sees its last block_size bytes; an hf causal LM
    refuses (422) a prompt of more tokens than its token limit (data.max_length)."""
    max_new_tokens: int = Field(16, ge=1)
    """Tokens (bytes for the built-in GPT) to generate at most; capped by the served model's
    `max_new_tokens` (422 above it). An hf causal LM stops earlier at its end-of-sequence token."""
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    """0 = greedy; otherwise sample from softmax(logits / temperature)."""
    top_k: int = Field(0, ge=0, le=256)
    """Sample among the k most likely tokens only (0 = all); ignored when greedy."""
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    """Seed of this request's sampler (same seed, same text, whatever it was batched with)."""
    stream: bool = False
    """Answer with server-sent events (`start`, one `token` per token, `done`) instead of one JSON body."""
