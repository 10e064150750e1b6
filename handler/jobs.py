"""The RunPod handler: one job in, its answer out as an async generator.

In: a RunPod job ``{"id": ..., "input": {...}}`` (see :mod:`handler.protocol` for the shapes).
Out, by shape and request:

* OpenAI route, streamed: SSE text strings, relayed as-is to the OpenAI client; the last one ends
  with ``data: [DONE]``. One-shot: one OpenAI response dict (for ``/v1/models``, the model list).
* native, streamed: OpenAI chunk dicts, the last carrying ``usage``. One-shot: one response dict.

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
from collections.abc import AsyncIterator, Callable
from typing import Any

from handler.errors import EngineDead, WorkerError, job_error
from handler.protocol import Engine, Shape, parse_job, to_engine_call
from handler.settings import Settings
from handler.streaming import cached_tokens, chunk_dicts, coalesce, sse_text, usage_in

log = logging.getLogger("handler.jobs")

Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]


def make_handler(
    engine: Engine, settings: Settings, on_engine_dead: Callable[[], None] = lambda: None
) -> Handler:
    """The async-generator function runpod calls once per job."""

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        async for output in run_job(job, engine, settings, on_engine_dead):
            yield output

    return handler


async def run_job(
    job: dict[str, Any], engine: Engine, settings: Settings, on_engine_dead: Callable[[], None]
) -> AsyncIterator[Any]:
    job_id = str(job.get("id") or "job")
    try:
        if engine.dead:
            raise EngineDead()
        call, shape = to_engine_call(parse_job(job.get("input")), settings, job_id)
        reply = await engine.serve(call)
        if isinstance(reply, dict):
            _log_usage(job_id, reply.get("usage"))
            yield reply
            return
        usage = None
        async for batch in coalesce(reply, settings.flush_interval_s):
            usage = usage_in(batch) or usage
            for output in _frame(batch, shape):
                yield output
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


def _frame(batch: list[str], shape: Shape) -> list[Any]:
    if shape is Shape.OPENAI:
        return [sse_text(batch)]
    return chunk_dicts(batch)


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
    if isinstance(exc, WorkerError) and exc.status < 500:
        log.info("job %s rejected: %s", job_id, exc.message)
    else:
        log.error("job %s failed", job_id, exc_info=exc)
