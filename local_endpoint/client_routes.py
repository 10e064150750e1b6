"""RunPod's public API for one endpoint id, under ``/v2/{id}``: ``run``, ``runsync`` (each with
RunPod's ``policy``: ``executionTimeout``, ``ttl``), ``status``, ``stream`` (incremental),
``cancel``, ``retry``, ``purge-queue``, ``health``, and the OpenAI route ``openai/v1/...``, which
turns a request into a ``{"openai_route", "openai_input"}`` job and relays the worker's SSE text as
it arrives. A client that leaves before its answer cancels the job.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.params import Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handler.errors import InvalidRequest, NotFound, WorkerError, from_validation_error
from local_endpoint.bodies import MAX_RUN_BYTES, MAX_RUNSYNC_BYTES, read_json, until_disconnected
from local_endpoint.jobstore import (
    RUN_RETENTION_S,
    RUNSYNC_RETENTION_S,
    Job,
    JobStore,
    Limits,
    NotRetryable,
    Status,
)
from local_endpoint.options import Options
from local_endpoint.relay import (
    job_failure,
    one_shot_output,
    openai_job_input,
    sse_chunk,
    sse_failure,
    status_body,
    wants_stream,
)
from local_endpoint.workers import WorkerPool

STREAM_POLL_S = 2.0  # how long /stream waits for new output before answering with none
WAIT_SLICE_S = 30.0


class Policy(BaseModel):
    """RunPod's per-job execution policy (milliseconds, RunPod's bounds)."""

    model_config = ConfigDict(extra="ignore")

    execution_timeout_ms: int | None = Field(
        None, alias="executionTimeout", ge=5_000, le=7 * 24 * 3600 * 1000
    )
    ttl_ms: int | None = Field(None, alias="ttl", ge=10_000, le=7 * 24 * 3600 * 1000)
    low_priority: bool = Field(False, alias="lowPriority")  # one local queue: no effect


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Any
    webhook: str | None = None
    policy: Policy | None = None

    def limits(self, options: Options, retention_s: float) -> Limits:
        policy = self.policy or Policy.model_validate({})
        timeout_ms, ttl_ms = policy.execution_timeout_ms, policy.ttl_ms
        return Limits(
            execution_timeout_s=options.execution_timeout_s
            if timeout_ms is None
            else timeout_ms / 1000,
            ttl_s=options.job_ttl_s if ttl_ms is None else ttl_ms / 1000,
            retention_s=retention_s,
        )


async def wait_or_cancel(
    request: Request, store: JobStore, job: Job, ready: Callable[[], bool]
) -> bool:
    """:func:`wait_until` ``ready()``, unless the client hangs up (or times out) first: then the
    job is cancelled, which stops it in its worker, and the answer is False."""
    waiting = asyncio.ensure_future(wait_until(store, job, ready))
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        gone.cancel()
    if gone.done() and not gone.cancelled() and not waiting.done():
        store.cancel(job)
        return False
    return True


async def wait_until(
    store: JobStore, job: Job, ready: Callable[[], bool], wait_s: float = math.inf
) -> None:
    """Wait until ``ready()`` (checked whenever the job changes), the job is final, or
    ``wait_s`` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not ready() and not job.final and loop.time() < deadline:
        await store.wait(job, min(WAIT_SLICE_S, deadline - loop.time()))


def find_job(store: JobStore, options: Options, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} on endpoint {options.endpoint_id!r}.")
    return job


def client_router(
    options: Options, store: JobStore, pool: WorkerPool, dependencies: Sequence[Depends]
) -> APIRouter:
    client = APIRouter(prefix=f"/v2/{options.endpoint_id}", dependencies=dependencies)

    def find(job_id: str) -> Job:
        return find_job(store, options, job_id)

    def submit(payload: Any, retention_s: float = RUN_RETENTION_S) -> Job:
        try:
            run = RunRequest.model_validate(payload)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        if run.input is None:
            raise InvalidRequest("input: a job needs an input", param="input")
        if run.webhook is not None:
            raise InvalidRequest(
                "webhook: the local endpoint does not call webhooks; poll /status instead",
                param="webhook",
            )
        if store.closed:
            raise WorkerError("The endpoint is shutting down.", status=503, type="Unavailable")
        return store.submit(run.input, run.limits(options, retention_s))

    # -- RunPod's public API ---------------------------------------------------------------------

    @client.post("/run")
    async def run(request: Request) -> dict[str, Any]:
        job = submit(await read_json(request, MAX_RUN_BYTES))
        return {"id": job.id, "status": job.status.value}

    @client.post("/runsync")
    async def runsync(
        request: Request, wait: Annotated[int, Query(ge=1000, le=300_000)] = 90_000
    ) -> dict[str, Any]:
        job = submit(await read_json(request, MAX_RUNSYNC_BYTES), RUNSYNC_RETENTION_S)
        await wait_until(store, job, lambda: job.final, wait / 1000)
        return status_body(job)

    @client.api_route("/status/{job_id}", methods=["GET", "POST"])
    async def status(job_id: str) -> dict[str, Any]:
        return status_body(find(job_id))

    @client.api_route("/stream/{job_id}", methods=["GET", "POST"])
    async def stream(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        if job.stream_read == len(job.stream):
            await store.wait(job, STREAM_POLL_S)
        body: dict[str, Any] = {
            "id": job.id,
            "status": job.status.value,
            "stream": [{"output": chunk} for chunk in store.read_stream(job)],
        }
        if job.error is not None:
            body["error"] = job.error
        return body

    @client.post("/cancel/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        store.cancel(job)
        return {"id": job.id, "status": job.status.value}

    @client.post("/retry/{job_id}")
    async def retry(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        if store.closed:
            raise WorkerError("The endpoint is shutting down.", status=503, type="Unavailable")
        try:
            store.retry(job)
        except NotRetryable as exc:
            raise InvalidRequest(str(exc)) from None
        return {"id": job.id, "status": job.status.value}

    @client.post("/purge-queue")
    async def purge_queue() -> dict[str, Any]:
        return {"removed": store.purge(), "status": "completed"}

    @client.get("/health")
    async def health() -> dict[str, Any]:
        counts = store.counts()
        return {
            "jobs": {
                "completed": counts[Status.COMPLETED],
                # RunPod's /health has no field for TIMED_OUT: they are failures
                "failed": counts[Status.FAILED] + counts[Status.TIMED_OUT],
                "cancelled": counts[Status.CANCELLED],
                "inProgress": counts[Status.IN_PROGRESS],
                "inQueue": counts[Status.IN_QUEUE],
                "retried": store.retried,
            },
            "workers": pool.states(),
        }

    # -- RunPod's OpenAI-compatible route --------------------------------------------------------

    @client.api_route("/openai/{path:path}", methods=["GET", "POST"])
    async def openai(path: str, request: Request) -> Response:
        body = await read_json(request, MAX_RUNSYNC_BYTES) if request.method == "POST" else None
        job = submit({"input": openai_job_input("/" + path, body)})
        # a client that leaves (or times out) before its answer cancels the job, as a stream's does
        if wants_stream(body):
            if not await wait_or_cancel(request, store, job, lambda: bool(job.stream)):
                return Response(status_code=499)
            if job.stream and isinstance(job.stream[0], str):
                return StreamingResponse(
                    relay(store, job),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
        if not await wait_or_cancel(request, store, job, lambda: job.final):
            return Response(status_code=499)
        return one_shot_response(job)

    return client


def one_shot_response(job: Job) -> JSONResponse:
    if job.status is Status.COMPLETED:
        return JSONResponse(one_shot_output(job.output))
    status, body = job_failure(job)
    return JSONResponse(body, status_code=status)


async def relay(store: JobStore, job: Job) -> AsyncIterator[str]:
    """The job's stream as SSE text, chunk by chunk as the worker posts them. A client that goes
    away cancels the job, which stops generation in the worker."""
    sent = 0
    try:
        while True:
            while sent < len(job.stream):
                yield sse_chunk(job.stream[sent])
                sent += 1
            if job.final:
                if job.status is not Status.COMPLETED:
                    yield sse_failure(job)
                return
            await store.wait(job, WAIT_SLICE_S)
    finally:
        store.cancel(job)
