"""The job contract and the engine interface.

In: a RunPod job's ``input``, in one of two shapes:

* the OpenAI route, as RunPod's ``/openai/v1`` proxy sends it:
  ``{"openai_route": "/v1/chat/completions", "openai_input": {...OpenAI request...}}``
  (``/v1/models`` comes with an empty or missing ``openai_input``);
* the native shape, for ``/run`` and ``/runsync`` callers:
  ``{"messages": [...]}`` or ``{"prompt": "..."}``, with optional ``sampling_params`` (OpenAI
  parameter names), ``stream`` and ``model``.

Out: an :class:`EngineCall` (route, OpenAI request body, request id) and the :class:`Shape` the
answer must take. The body itself is validated by the engine against vLLM's own request models.

Errors: :class:`~handler.errors.InvalidRequest` (400) for a malformed envelope,
:class:`~handler.errors.NotFound` (404) for an unknown route.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from handler.errors import InvalidRequest, NotFound, from_validation_error
from handler.settings import Settings

Route = Literal["/v1/chat/completions", "/v1/completions", "/v1/models"]
ROUTES: tuple[Route, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/models")


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
    prompt: str | list[str] | list[int] | None = None
    sampling_params: dict[str, Any] = {}
    stream: bool = False
    model: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> NativeJob:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (chat) or 'prompt' (completion)")
        return self


def parse_job(job_input: Any) -> OpenAIRouteJob | NativeJob:
    """Validate a job's input into one of the two shapes."""
    if not isinstance(job_input, dict):
        raise InvalidRequest("job input must be a JSON object", param="input")
    model = OpenAIRouteJob if "openai_route" in job_input else NativeJob
    try:
        return model.model_validate(job_input)
    except ValidationError as exc:
        raise from_validation_error(exc, prefix="input.") from None


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
    if route != "/v1/models":
        body["request_id"] = request_id
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
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = settings.default_max_tokens
    if job.stream:
        body.setdefault("stream_options", {"include_usage": True})
    body.update(model=job.model or settings.model_id, stream=job.stream, request_id=request_id)
    if job.messages is not None:
        body["messages"] = job.messages
        return EngineCall(route="/v1/chat/completions", body=body, request_id=request_id)
    body["prompt"] = job.prompt
    return EngineCall(route="/v1/completions", body=body, request_id=request_id)
