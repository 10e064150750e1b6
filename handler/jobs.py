"""The RunPod handler: one job in, its answer out as an async generator.

In: a RunPod job ``{"id": ..., "input": {...}}`` (see :mod:`handler.protocol` for the shapes).
Out, by shape and request:

* OpenAI route, streamed: SSE text strings, relayed as-is to the OpenAI client; the last one ends
  with ``data: [DONE]``. One-shot: one OpenAI response dict (for ``/v1/models``, the model list).
* native, streamed: OpenAI chunk dicts, the last carrying ``usage``. One-shot: one response dict.
  With ``NATIVE_OUTPUT_FORMAT=worker-vllm-v2`` (or a job's ``use_openai_format: false``), RunPod's
  official worker's v2 shape instead (:mod:`handler.v2_shape`).
* native batch: one ``{"results": [...]}`` dict, a response or an ``{"error": {...}}`` object per
  request, in the order given. The requests run concurrently in the engine.

``/v1/models`` answers carry the OpenRouter fields (:mod:`handler.model_card`).

Errors: the handler yields ``{"error": "<OpenAI error object as JSON text>"}`` and stops. runpod's
SDK fails the job and stores that text as the job's error, so the caller parses it back with one
``json.loads`` and gets ``{"error": {"message", "type", "param", "code"}}``. An error after a stream
has started reaches an OpenAI-route client inside the stream, as vLLM's server sends it.
A cancelled job aborts its engine request and re-raises. When the engine has died the job fails
with a 503 and ``on_engine_dead`` is called, so the worker can stop and exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from handler.engine.interface import Engine, EngineCall, EngineReply
from handler.errors import (
    EngineDead,
    InvalidRequest,
    NotFound,
    WorkerError,
    error_body,
    job_error,
)
from handler.model_card import describe_models
from handler.protocol import (
    BATCH_HINTS,
    NativeBatch,
    NativeJob,
    Shape,
    batch_items,
    parse_job,
    to_engine_call,
)
from handler.settings import Settings
from handler.streaming import (
    Pacer,
    cached_tokens,
    chunk_dicts,
    coalesce,
    split_at_error,
    sse_text,
    usage_in,
)
from handler.v2_shape import V2Stream, v2_response

log = logging.getLogger("handler.jobs")

Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]


def make_handler(
    engine: Engine, settings: Settings, on_engine_dead: Callable[[], None] = lambda: None
) -> Handler:
    """The async-generator function runpod calls once per job."""

    pacer = Pacer(settings.flush_interval_s, settings.posts_per_s(engine.model_info.on_cpu))
    noted: set[str] = set()

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        async for output in run_job(job, engine, settings, on_engine_dead, pacer, noted):
            yield output

    return handler


async def run_job(
    job: dict[str, Any],
    engine: Engine,
    settings: Settings,
    on_engine_dead: Callable[[], None],
    pacer: Pacer,
    noted: set[str] | None = None,
) -> AsyncIterator[Any]:
    job_id = str(job.get("id") or "job")
    try:
        if engine.dead:
            raise EngineDead()
        parsed = parse_job(job.get("input"))
        if isinstance(parsed, NativeBatch):
            items = batch_items(parsed, settings)
            _note_ignored([i for i in items if isinstance(i, NativeJob)], noted)
            yield await run_batch(items, engine, settings, job_id)
            return
        if isinstance(parsed, NativeJob):
            _note_ignored([parsed], noted)
        call, shape = to_engine_call(parsed, settings, job_id)
        if call.route.startswith(MODEL_PREFIX):
            yield await model_card(call.route.removeprefix(MODEL_PREFIX), engine, settings)
            return
        reply = await engine.serve(call)
        if isinstance(reply, dict):
            yield _one_shot(reply, call, shape, engine, settings, job_id)
            return
        usage = None
        frame = _framer(shape, call)
        with pacer.streaming():
            async for batch in coalesce(reply, pacer.interval):
                usage = usage_in(batch) or usage
                events, failure = split_at_error(batch)
                for output in frame(events) if events else []:
                    yield output
                if failure is not None:
                    raise failure
        _log_usage(job_id, usage)
    except asyncio.CancelledError:
        log.info("job %s cancelled; its engine request was aborted", job_id)
        raise
    except Exception as exc:
        if isinstance(exc, EngineDead) or engine.dead:
            on_engine_dead()
            exc = EngineDead()
        _log_failure(job_id, exc)
        yield job_error(exc)


async def run_batch(
    items: list[NativeJob | InvalidRequest], engine: Engine, settings: Settings, job_id: str
) -> dict[str, Any]:
    """Every request of a batch at once; each answer, or error, in its request's place."""

    async def answer(i: int, item: NativeJob | InvalidRequest) -> dict[str, Any]:
        if isinstance(item, InvalidRequest):
            return error_body(item)
        try:
            call, shape = to_engine_call(item, settings, f"{job_id}-{i}")
            reply = await engine.serve(call)
            return _one_shot(reply, call, shape, engine, settings, f"{job_id}-{i}")
        except Exception as exc:
            return error_body(exc)

    results = await asyncio.gather(*(answer(i, item) for i, item in enumerate(items)))
    if engine.dead:
        raise EngineDead()
    return {"results": results}


MODEL_PREFIX = "/v1/models/"


async def model_card(model_id: str, engine: Engine, settings: Settings) -> dict[str, Any]:
    """``/v1/models/{id}``: the card ``/v1/models`` lists for that id (vLLM's server has no such
    route), or a 404 as OpenAI answers it."""
    listing = await engine.serve(EngineCall(route="/v1/models", method="GET"))
    if not isinstance(listing, dict):
        raise TypeError("the engine streamed the model list")
    for card in describe_models(listing, settings, engine.model_info)["data"]:
        if card.get("id") == model_id:
            return dict(card)
    raise NotFound(f"The model `{model_id}` does not exist.", param="model")


def _one_shot(
    reply: EngineReply,
    call: EngineCall,
    shape: Shape,
    engine: Engine,
    settings: Settings,
    job_id: str,
) -> dict[str, Any]:
    if not isinstance(reply, dict):  # a stream where none was asked for: never from vLLM
        raise TypeError("the engine streamed a one-shot request")
    if call.route == "/v1/models":
        return describe_models(reply, settings, engine.model_info)
    _log_usage(job_id, reply.get("usage"))
    return v2_response(reply) if shape is Shape.V2 else reply


def _framer(shape: Shape, call: EngineCall) -> Callable[[list[str]], list[Any]]:
    """How one stream's batches become yields, for the job's shape."""
    if shape is Shape.OPENAI:
        return lambda batch: [sse_text(batch)]
    if shape is Shape.V2:
        n = (call.body or {}).get("n")
        return V2Stream(n if isinstance(n, int) else 1).frame
    return chunk_dicts


_BY_TIME = "streams are batched by time here (STREAM_FLUSH_INTERVAL_MS, STREAM_POSTS_PER_S)"
IGNORED_BECAUSE: dict[str, str] = {
    **dict.fromkeys(BATCH_HINTS, _BY_TIME),
    "prompt": "'messages' given too, and win (as in RunPod's official worker)",
}


def _note_ignored(jobs: list[NativeJob], noted: set[str] | None) -> None:
    """Log, once per worker, each accepted-and-ignored key a job carries."""
    new = sorted({key for job in jobs for key in job.ignored()} - (noted or set()))
    if not new:
        return
    log.info(
        "job keys accepted and ignored (said once per worker): %s",
        "; ".join(f"{key}: {IGNORED_BECAUSE.get(key, 'not used')}" for key in new),
    )
    if noted is not None:
        noted.update(new)


def _log_usage(job_id: str, usage: Any) -> None:
    """Prompt tokens and how many came from a cache (vLLM's prefix cache or LMCache); a stream
    that did not ask for usage reports none."""
    if isinstance(usage, dict) and "prompt_tokens" in usage:
        log.info(
            "job %s: %s prompt tokens, %d from cache, %s generated",
            job_id,
            usage["prompt_tokens"],
            cached_tokens(usage),
            usage.get("completion_tokens"),
        )


def _log_failure(job_id: str, exc: Exception) -> None:
    """The job id, error type, parameter and status; never the message, which may quote the
    request (a prompt, a schema). An unexpected exception also logs where it was raised (its
    frames, without the message); messages only at DEBUG."""
    error = error_body(exc)["error"]
    status = int(error["code"])
    verb, level = ("rejected", logging.INFO) if status < 500 else ("failed", logging.ERROR)
    where = ""
    if error["type"] == "InternalServerError" and not isinstance(exc, WorkerError):
        frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
        where = f" from {type(exc).__name__}\n{frames}"
    log.log(
        level,
        "job %s %s: %s (param %s, status %d)%s",
        job_id,
        verb,
        error["type"],
        error.get("param"),
        status,
        where,
    )
    log.debug("job %s: %r", job_id, exc)
