"""The job contract: what a job's ``input`` may be, and the engine call it becomes.

In: a RunPod job's ``input``, in one of four shapes:

* the OpenAI route, as RunPod's ``/openai/v1`` proxy sends it:
  ``{"openai_route": "/v1/chat/completions", "openai_input": {...request body...}}``; any public
  route of vLLM's server (:data:`PUBLIC_ROUTES`: chat, completions, Responses, Anthropic Messages,
  embeddings, pooling, score, rerank, tokenize, render, ...). A GET route (``/v1/models``,
  ``/v1/models/{id}``) comes with an empty or missing ``openai_input``;
* the native shape, for ``/run`` and ``/runsync`` callers: ``{"messages": [...]}`` (chat),
  ``{"prompt": "..."}`` (completion) or ``{"input": ...}`` (embeddings), with optional
  ``sampling_params`` (any other field of the OpenAI request, by its OpenAI name), ``tools``,
  ``tool_choice``, ``stream`` and ``model``, and RunPod's official worker's keys
  (``apply_chat_template``, ``use_openai_format``, the batch-size hints: :class:`NativeJob`);
* the native generic form: ``{"route": "/v1/rerank", "body": {...}}``, any public route, with an
  optional ``method`` that must be the route's;
* a native batch: ``{"requests": [native job, ...]}``, run concurrently, answered in order.

Out: an :class:`EngineCall` (path, method, request body, request id) and the :class:`Shape` the
answer must take. The body itself is validated by vLLM's own app, once vLLM's removed ``guided_*``
fields have been translated (:mod:`handler.guided`).

Errors: :class:`~handler.errors.InvalidRequest` (400) for a malformed envelope (405 for a
``method`` the route does not take),
:class:`~handler.errors.NotFound` (404) for a route that is not public (administrative and
development routes of vLLM's server are never reachable from a job).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from handler.engine.interface import EngineCall, Method
from handler.errors import InvalidRequest, NotFound, from_validation_error
from handler.guided import translate_guided
from handler.settings import Settings

# The routes of vLLM's server a job may call, with their method: its public inference API. Any
# other route it registers is refused (REFUSED_ROUTES says why, for each one vLLM 0.32 has; a test
# walks the app's routes and fails on one that is in neither table). A route the served model does
# not have (rerank on a generating model) is a 404 from the app itself.
PUBLIC_ROUTES: dict[str, Method] = {
    "/v1/models": "GET",
    "/v1/models/{model_id}": "GET",  # answered by the worker from /v1/models (vLLM 0.32 has none)
    "/v1/chat/completions": "POST",
    "/v1/chat/completions/batch": "POST",
    "/v1/chat/completions/render": "POST",
    "/v1/completions": "POST",
    "/v1/completions/render": "POST",
    "/v1/responses": "POST",
    "/v1/responses/render": "POST",
    "/v1/responses/{response_id}": "GET",
    "/v1/responses/{response_id}/cancel": "POST",
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
    "/v1/messages/render": "POST",
    "/v1/systemone": "POST",
    "/generative_scoring": "POST",
    "/tokenize": "POST",
    "/detokenize": "POST",
    "/v1/embeddings": "POST",
    "/v2/embed": "POST",
    "/pooling": "POST",
    "/classify": "POST",
    "/score": "POST",
    "/v1/score": "POST",
    "/rerank": "POST",
    "/v1/rerank": "POST",
    "/v2/rerank": "POST",
}
_SERVER = "part of vLLM's HTTP server, not of its inference API"
_ADMIN = "administrative: changes or inspects the engine for every caller"
_SCALE_OUT = "internal to vLLM's disaggregated serving"
REFUSED_ROUTES: dict[str, str] = {
    **dict.fromkeys(
        ["/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/health", "/ping"], _SERVER
    ),
    **dict.fromkeys(["/metrics", "/load", "/version", "/kv_event_sources"], _SERVER),
    "/invocations": "SageMaker's entry point; call the route itself",
    **dict.fromkeys(
        [
            "/inference/v1/generate",
            "/inference/v1/abort_requests",
            "/abort_requests",
            "/v1/chat/completions/derender",
            "/v1/completions/derender",
        ],
        _SCALE_OUT,
    ),
    **dict.fromkeys(
        ["/v1/audio/transcriptions", "/v1/audio/translations"],
        "takes a multipart audio upload, which a JSON job cannot carry",
    ),
    "/v1/realtime": "a WebSocket, which a job cannot carry",
    **dict.fromkeys(
        [
            "/scale_elastic_ep",
            "/is_scaling_elastic_ep",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/adapters",  # SageMaker's LoRA loading, beside the two above
            "/adapters/{adapter_name}",
            "/start_profile",
            "/stop_profile",
            "/server_info",
            "/reset_prefix_cache",
            "/reset_mm_cache",
            "/reset_encoder_cache",
            "/collective_rpc",
            "/sleep",
            "/wake_up",
            "/is_sleeping",
            "/release_kv_cache_memory",
            "/tokenizer_info",
            "/pause",
            "/resume",
            "/is_paused",
            "/init_weight_transfer_engine",
            "/shutdown_weight_transfer_engine",
            "/start_weight_update",
            "/start_draft_weight_update",
            "/update_weights",
            "/finish_weight_update",
            "/update_weight_version",
            "/weight_info",
            "/weight_checker",
            "/get_world_size",
            "/fault_tolerance/apply",
            "/fault_tolerance/status",
        ],
        _ADMIN,
    ),
}
# Older names of routes, kept so that jobs written for them keep working.
ROUTE_ALIASES: dict[str, str] = {"/v1/tokenize": "/tokenize", "/v1/detokenize": "/detokenize"}
ROUTES: tuple[str, ...] = tuple(PUBLIC_ROUTES)


def _pattern(template: str) -> re.Pattern[str]:
    """A route template as a regex; a model id may hold slashes (``org/model``)."""
    regex = re.escape(template).replace(r"\{model_id\}", ".+")
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", regex) + "$")


_PATTERNS = [(_pattern(template), template) for template in PUBLIC_ROUTES]


class Shape(enum.Enum):
    """How the handler frames the engine's answer."""

    OPENAI = "openai"  # streams as SSE text, exactly what an OpenAI client reads
    NATIVE = "native"  # streams as OpenAI chunk dicts
    V2 = "worker-vllm-v2"  # RunPod's official worker v2.x: {"choices": [{"tokens"}], "usage"}


class OpenAIRouteJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    openai_route: str
    openai_input: dict[str, Any] | None = None


# Keys of RunPod's official worker v2.x that set its stream's batching (tokens per POST). This
# worker batches streams by time (STREAM_FLUSH_INTERVAL_MS, STREAM_POSTS_PER_S): they are accepted
# and ignored, and the log says so once.
BATCH_HINTS = ("max_batch_size", "min_batch_size", "batch_size_growth_factor")


class NativeJob(BaseModel):
    """A native job; RunPod's official worker's keys (v2.x and HEAD) keep their meaning there:
    ``messages`` wins over ``prompt`` when both are given, ``apply_chat_template`` sends a text
    prompt as one user message through chat, ``use_openai_format`` picks OpenAI objects (true)
    or v2's shape (false) for this job, and ``sampling_params.model`` names the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[dict[str, Any]] | None = None
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] = {}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    model: str | None = None
    apply_chat_template: bool = False
    use_openai_format: bool | None = None
    max_batch_size: int | None = None
    min_batch_size: int | None = None
    batch_size_growth_factor: float | None = None

    @model_validator(mode="after")
    def _one_input(self) -> NativeJob:
        given = [k for k in ("messages", "prompt", "input") if getattr(self, k) is not None]
        if given != ["messages", "prompt"] and len(given) != 1:
            raise ValueError(
                "give exactly one of 'messages' (chat), 'prompt' (completion) or 'input' "
                "(embeddings)"
            )
        if (self.tools is not None or self.tool_choice is not None) and not self.chat:
            raise ValueError("'tools' and 'tool_choice' go with 'messages'")
        if self.input is not None and self.stream:
            raise ValueError("embeddings are not streamed")
        if self.apply_chat_template and self.messages is None and not isinstance(self.prompt, str):
            raise ValueError("'apply_chat_template' takes a text 'prompt'")
        return self

    @property
    def chat(self) -> bool:
        """Whether the job goes to chat: it has messages, or a prompt to send as one."""
        return self.messages is not None or (self.apply_chat_template and self.prompt is not None)

    def ignored(self) -> list[str]:
        """The keys given that this worker accepts and ignores."""
        keys = [k for k in BATCH_HINTS if getattr(self, k) is not None]
        if self.messages is not None and self.prompt is not None:
            keys.append("prompt")
        return keys


class NativeBatch(BaseModel):
    """Several native jobs in one; each item is validated on its own, so one bad item gets its
    own error and the others still run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: list[dict[str, Any]] = Field(min_length=1)


class NativeRoute(BaseModel):
    """Any public route for ``/run`` callers: the path and the request body, as the OpenAI route
    carries them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    route: str
    body: dict[str, Any] | None = None
    method: str | None = None  # optional, checked against the route's (GET or POST)


ParsedJob = OpenAIRouteJob | NativeJob | NativeBatch | NativeRoute


def parse_job(job_input: Any) -> ParsedJob:
    """Validate a job's input into one of the four shapes."""
    if not isinstance(job_input, dict):
        raise InvalidRequest("job input must be a JSON object", param="input")
    model: type[ParsedJob] = NativeJob
    if "openai_route" in job_input:
        model = OpenAIRouteJob
    elif "requests" in job_input:
        model = NativeBatch
    elif "route" in job_input:
        model = NativeRoute
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
    job: OpenAIRouteJob | NativeJob | NativeRoute, settings: Settings, job_id: str
) -> tuple[EngineCall, Shape]:
    """The engine call for a parsed job, and the shape its answer takes."""
    request_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
    if isinstance(job, OpenAIRouteJob):
        return route_call(job.openai_route, job.openai_input, request_id), Shape.OPENAI
    if isinstance(job, NativeRoute):
        call = route_call(job.route, job.body, request_id, method=job.method, prefix="input.body.")
        return call, Shape.NATIVE
    shape = native_shape(job, settings)
    return _native_call(job, settings, request_id, shape), shape


def native_shape(job: NativeJob, settings: Settings) -> Shape:
    """OpenAI objects, or v2's shape: the job's ``use_openai_format`` if given, else the setting.
    Embeddings always answer as OpenAI does (v2 had none)."""
    if job.input is not None:
        return Shape.NATIVE
    openai = job.use_openai_format
    if openai is None:
        openai = settings.native_output_format == "openai"
    return Shape.NATIVE if openai else Shape.V2


def route_call(
    raw_route: str,
    raw_body: Mapping[str, Any] | None,
    request_id: str,
    *,
    method: str | None = None,
    prefix: str = "input.openai_input.",
) -> EngineCall:
    """A call of a public route, with the body given (none for a GET route). ``method``, when
    given, must be the route's; removed guided-decoding fields are translated."""
    route, route_method = normalize_route(raw_route)
    _check_method(route, route_method, method)
    if route_method == "GET":
        return EngineCall(route=route, method="GET", request_id=request_id)
    body = translate_guided(route, raw_body or {}, prefix)
    if route == "/v1/responses":
        # vLLM takes the Responses API's response id from the body; OpenAI's start with resp_
        body["request_id"] = "resp_" + request_id
    return EngineCall(route=route, body=body, request_id=request_id)


def _check_method(route: str, expected: Method, given: str | None) -> None:
    if given is not None and given.strip().upper() != expected:
        raise InvalidRequest(
            f"route {route} takes {expected}, not {given.strip()[:20]!r}",
            param="input.method",
            status=405,
            type="MethodNotAllowedError",
        )


def normalize_route(raw: str) -> tuple[str, Method]:
    """The public route a job names, and its method. '/v1/chat/completions',
    'v1/chat/completions/' and '/chat/completions' are one route; a route of vLLM's server that
    is not public, or no route at all, is a 404 that says which."""
    path = "/" + raw.strip().split("?", 1)[0].strip("/")
    candidates = [path] if path.startswith("/v1/") else [path, "/v1" + path]
    for candidate in candidates:
        candidate = ROUTE_ALIASES.get(candidate, candidate)
        for pattern, template in _PATTERNS:
            if pattern.match(candidate):
                return candidate, PUBLIC_ROUTES[template]
    shown = raw[:200]
    if path in REFUSED_ROUTES:
        raise NotFound(
            f"route {shown!r} is not available to jobs ({REFUSED_ROUTES[path]})",
            param="openai_route",
        )
    raise NotFound(
        f"unknown route {shown!r}; public routes: {', '.join(PUBLIC_ROUTES)}",
        param="openai_route",
    )


def _native_call(job: NativeJob, settings: Settings, request_id: str, shape: Shape) -> EngineCall:
    route = "/v1/embeddings" if job.input is not None else "/v1/completions"
    route = "/v1/chat/completions" if job.chat else route
    body = translate_guided(route, job.sampling_params, "input.sampling_params.")
    body["model"] = _model(job, settings)
    if job.input is not None:
        body["input"] = job.input
        return EngineCall(route=route, body=body, request_id=request_id)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = settings.default_max_tokens
    if job.stream:
        body["stream_options"] = _stream_options(body.get("stream_options"), shape)
    body["stream"] = job.stream
    if job.chat:
        tools = {"tools": job.tools, "tool_choice": job.tool_choice}
        body.update({k: v for k, v in tools.items() if v is not None}, messages=_messages(job))
        body.update(_chat_logprobs(body))
    else:
        body["prompt"] = job.prompt
    return EngineCall(route=route, body=body, request_id=request_id)


def _chat_logprobs(body: Mapping[str, Any]) -> dict[str, Any]:
    """``logprobs`` as a number, as vLLM's SamplingParams took it (RunPod's official worker v2
    passed ``sampling_params`` there): that many top alternatives per token, which chat calls
    ``logprobs: true, top_logprobs: N``."""
    logprobs = body.get("logprobs")
    if type(logprobs) is not int:  # a bool is chat's own meaning
        return {}
    return {"logprobs": True, "top_logprobs": body.get("top_logprobs", logprobs)}


def _model(job: NativeJob, settings: Settings) -> Any:
    """``model`` at the top level or in ``sampling_params`` (where RunPod's official worker
    takes it), else the served model; two different names are a 400."""
    inner = job.sampling_params.get("model")
    if job.model is not None and inner is not None and inner != job.model:
        raise InvalidRequest(
            "'model' and 'sampling_params.model' name different models; give one",
            param="input.sampling_params.model",
        )
    return job.model or inner or settings.model_id


def _messages(job: NativeJob) -> list[dict[str, Any]]:
    if job.messages is not None:
        return job.messages
    return [{"role": "user", "content": job.prompt}]


def _stream_options(given: Any, shape: Shape) -> Any:
    """Native streams always end with usage; v2's shape reports usage in every batch, so vLLM
    is asked for it in every chunk."""
    if shape is Shape.V2:
        options = given if isinstance(given, dict) else {}
        return {**options, "include_usage": True, "continuous_usage_stats": True}
    return {"include_usage": True} if given is None else given
