"""The job contract and the engine interface.

In: a RunPod job's ``input``, in one of three shapes:

* the OpenAI route, as RunPod's ``/openai/v1`` proxy sends it:
  ``{"openai_route": "/v1/chat/completions", "openai_input": {...OpenAI request...}}``
  (``/v1/models`` comes with an empty or missing ``openai_input``);
* the native shape, for ``/run`` and ``/runsync`` callers: ``{"messages": [...]}`` (chat),
  ``{"prompt": "..."}`` (completion) or ``{"input": ...}`` (embeddings), with optional
  ``sampling_params`` (any other field of the OpenAI request, by its OpenAI name), ``tools``,
  ``tool_choice``, ``stream`` and ``model``;
* a native batch: ``{"requests": [native job, ...]}``, run concurrently, answered in order.

Out: an :class:`EngineCall` (route, OpenAI request body, request id) and the :class:`Shape` the
answer must take. The body itself is validated by the engine against vLLM's own request models.

Errors: :class:`~handler.errors.InvalidRequest` (400) for a malformed envelope,
:class:`~handler.errors.NotFound` (404) for an unknown route.
"""

from __future__ import annotations

import enum
import typing
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from handler.errors import InvalidRequest, NotFound, from_validation_error
from handler.settings import Settings

Route = Literal[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/embeddings",
    "/v1/tokenize",
    "/v1/detokenize",
    "/v1/responses",
]
ROUTES: tuple[Route, ...] = typing.get_args(Route)
# Routes whose request carries the engine request id (tokenizing runs no engine request).
_TRACKED: frozenset[str] = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}
)


class Shape(enum.Enum):
    """How the handler frames the engine's answer."""

    OPENAI = "openai"  # streams as SSE text, exactly what an OpenAI client reads
    NATIVE = "native"  # streams as OpenAI chunk dicts


@dataclass(frozen=True)
class EngineCall:
    route: Route
    body: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(frozen=True)
class ModelInfo:
    """What the engine knows of the served model, for the /v1/models listing."""

    context_length: int
    dtype: str  # weight dtype, as torch names it without the prefix: "bfloat16"
    quantization: str | None = None  # vLLM's quantization method ("fp8", "awq"), if any
    multimodal: bool = False
    tools: bool = False  # a tool-call parser is set (tool_choice "auto" works)
    reasoning: bool = False  # a reasoning parser is set
    generates: bool = True  # chat and completions work
    embeds: bool = False  # /v1/embeddings works


# An engine answers with a JSON-safe response dict, or with SSE events ('data: {...}\n\n', ending
# with 'data: [DONE]\n\n') for a streamed request.
EngineReply = dict[str, Any] | AsyncIterator[str]


class Engine(Protocol):
    """What the handler needs from an inference engine (vLLM in production, a fake in tests)."""

    async def serve(self, call: EngineCall) -> EngineReply:
        """Run one OpenAI request; raise a WorkerError for an error answer."""
        ...

    @property
    def dead(self) -> bool:
        """True once the engine can serve no more requests."""
        ...

    @property
    def model_info(self) -> ModelInfo:
        """Facts about the served model."""
        ...

    def running_requests(self) -> int:
        """Requests the engine is generating for right now."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and every process it started."""
        ...


class OpenAIRouteJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    openai_route: str
    openai_input: dict[str, Any] | None = None


class NativeJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[dict[str, Any]] | None = None
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] = {}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    model: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> NativeJob:
        given = [k for k in ("messages", "prompt", "input") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'messages' (chat), 'prompt' (completion) or 'input' "
                "(embeddings)"
            )
        if (self.tools is not None or self.tool_choice is not None) and self.messages is None:
            raise ValueError("'tools' and 'tool_choice' go with 'messages'")
        if self.input is not None and self.stream:
            raise ValueError("embeddings are not streamed")
        return self


class NativeBatch(BaseModel):
    """Several native jobs in one; each item is validated on its own, so one bad item gets its
    own error and the others still run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: list[dict[str, Any]] = Field(min_length=1)


def parse_job(job_input: Any) -> OpenAIRouteJob | NativeJob | NativeBatch:
    """Validate a job's input into one of the three shapes."""
    if not isinstance(job_input, dict):
        raise InvalidRequest("job input must be a JSON object", param="input")
    model: type[OpenAIRouteJob | NativeJob | NativeBatch] = NativeJob
    if "openai_route" in job_input:
        model = OpenAIRouteJob
    elif "requests" in job_input:
        model = NativeBatch
    try:
        return model.model_validate(job_input)
    except ValidationError as exc:
        raise from_validation_error(exc, prefix="input.") from None


def batch_items(batch: NativeBatch, settings: Settings) -> list[NativeJob | InvalidRequest]:
    """Each request of a batch parsed alone: a one-shot native job, or the error that says why
    not (so it takes its place in the answer)."""
    if len(batch.requests) > settings.max_batch_requests:
        raise InvalidRequest(
            f"a batch may carry at most {settings.max_batch_requests} requests "
            f"(MAX_BATCH_REQUESTS), got {len(batch.requests)}",
            param="input.requests",
        )
    items: list[NativeJob | InvalidRequest] = []
    for i, raw in enumerate(batch.requests):
        try:
            item = NativeJob.model_validate(raw)
        except ValidationError as exc:
            items.append(from_validation_error(exc, prefix=f"input.requests.{i}."))
            continue
        if item.stream:
            items.append(
                InvalidRequest("requests in a batch are not streamed", param=f"input.requests.{i}")
            )
        else:
            items.append(item)
    return items


def to_engine_call(
    job: OpenAIRouteJob | NativeJob, settings: Settings, job_id: str
) -> tuple[EngineCall, Shape]:
    """The engine call for a parsed job, and the shape its answer takes."""
    request_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
    if isinstance(job, OpenAIRouteJob):
        return _openai_call(job, request_id), Shape.OPENAI
    return _native_call(job, settings, request_id), Shape.NATIVE


def _openai_call(job: OpenAIRouteJob, request_id: str) -> EngineCall:
    route = normalize_route(job.openai_route)
    body = dict(job.openai_input or {})
    if route in _TRACKED:
        # vLLM uses it as the Responses API's response id, which OpenAI's start with resp_
        body["request_id"] = ("resp_" if route == "/v1/responses" else "") + request_id
    return EngineCall(route=route, body=body, request_id=request_id)


def normalize_route(raw: str) -> Route:
    """'/v1/chat/completions', 'v1/chat/completions/' and '/chat/completions' are one route."""
    path = "/" + raw.strip().strip("/")
    if not path.startswith("/v1/"):
        path = "/v1" + path
    for route in ROUTES:
        if route == path:
            return route
    raise NotFound(
        f"unknown openai_route {raw[:200]!r}; supported routes: {', '.join(ROUTES)}",
        param="openai_route",
    )


def _native_call(job: NativeJob, settings: Settings, request_id: str) -> EngineCall:
    body: dict[str, Any] = dict(job.sampling_params)
    body.update(model=job.model or settings.model_id, request_id=request_id)
    if job.input is not None:
        body["input"] = job.input
        return EngineCall(route="/v1/embeddings", body=body, request_id=request_id)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = settings.default_max_tokens
    if job.stream:
        body.setdefault("stream_options", {"include_usage": True})
    body["stream"] = job.stream
    if job.messages is not None:
        tools = {"tools": job.tools, "tool_choice": job.tool_choice}
        body.update({k: v for k, v in tools.items() if v is not None}, messages=job.messages)
        return EngineCall(route="/v1/chat/completions", body=body, request_id=request_id)
    body["prompt"] = job.prompt
    return EngineCall(route="/v1/completions", body=body, request_id=request_id)
