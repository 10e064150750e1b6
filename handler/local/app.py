"""The local endpoint's HTTP surface, for one endpoint id, all under ``/v2/{id}``.

Client side (RunPod's public API): ``run``, ``runsync`` (each with RunPod's ``policy``:
``executionTimeout``, ``ttl``), ``status``, ``stream`` (incremental), ``cancel``, ``retry``,
``purge-queue``, ``health``, and the OpenAI route ``openai/v1/...``, which turns a request into a
``{"openai_route", "openai_input"}`` job and relays the worker's SSE text as it arrives.
Worker side (what runpod's SDK calls in production): ``job-take``, ``job-take-batch``,
``job-stream``, ``job-done``, ``job-stop``, ``ping``, each refused (401) without the worker key
the endpoint gave its workers as ``RUNPOD_AI_API_KEY``. Plus ``/metrics`` (Prometheus) and
``/local/workers`` (the worker processes and their metrics URLs), which need the client key when
one is set.

Bodies: a declared ``Content-Length`` over the limit is refused (413) before anything is read, and
reading stops at the limit (chunked bodies too). A body the endpoint could not carry to a worker
as JSON (``NaN``/``Infinity``, lone UTF-16 surrogates, nesting deeper than
:data:`MAX_JSON_DEPTH`) is refused with a 400 at submission, so no job is accepted and then lost.

Errors are OpenAI's error object, with the HTTP status in ``code``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from handler.errors import (
    InvalidRequest,
    NotFound,
    WorkerError,
    error_body,
    from_validation_error,
    job_error,
)
from handler.local.jobstore import (
    RUN_RETENTION_S,
    RUNSYNC_RETENTION_S,
    Job,
    JobStore,
    Limits,
    NotRetryable,
    Status,
)
from handler.local.metrics import Metrics
from handler.local.options import Options
from handler.local.relay import (
    job_failure,
    one_shot_output,
    openai_job_input,
    sse_chunk,
    sse_failure,
    status_body,
    wants_stream,
)
from handler.local.workers import WorkerPool

MAX_RUN_BYTES = 10 * 1024 * 1024  # RunPod's limits on a request body
MAX_RUNSYNC_BYTES = 20 * 1024 * 1024
# Containers inside containers a request body may have: deep enough for any real JSON schema,
# shallow enough that the job (wrapped in a few more levels), the worker's JSON decoding and the
# handler's validation all stay far from Python's recursion limit (1000).
MAX_JSON_DEPTH = 128
STREAM_POLL_S = 2.0  # how long /stream waits for new output before answering with none
WAIT_SLICE_S = 30.0
UNCARRYABLE = "The job's input cannot be encoded as JSON for a worker; it was not run."


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


class Unauthorized(WorkerError):
    status = 401
    type = "AuthenticationError"


def error_response(exc: WorkerError) -> JSONResponse:
    # a body refused for its size is not read further: the connection cannot be reused
    headers = {"Connection": "close"} if exc.status == 413 else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def too_large(limit: int) -> WorkerError:
    return WorkerError(
        f"Request body is larger than the limit of {limit} bytes.",
        status=413,
        type="RequestTooLargeError",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) by its declared length before reading, or once ``limit`` bytes
    have arrived without an end (chunked bodies declare none)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> None:
    raise InvalidRequest(f"Request body holds {name}, which JSON cannot carry; send a number.")


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_carryable(value: Any) -> None:
    """Refuse what cannot travel to a worker as JSON: nesting over :data:`MAX_JSON_DEPTH` and
    strings with a lone UTF-16 surrogate (no UTF-8 encoding exists for one). Iterative, so any
    depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise InvalidRequest(
                    'Request body holds a lone UTF-16 surrogate (such as "\\ud800"), which '
                    "has no UTF-8 encoding."
                )
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"Request body nests deeper than {MAX_JSON_DEPTH} levels.")
        children = [*item, *item.values()] if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest(f"Request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    check_carryable(value)
    return value


async def read_json(request: Request, limit: int) -> Any:
    return parse_json(await read_body(request, limit))


def encode_json(value: Any) -> bytes:
    """JSON as starlette's ``JSONResponse`` writes it; ValueError (or RecursionError) when the
    value has no JSON form."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def create_app(options: Options, store: JobStore, pool: WorkerPool, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="Local RunPod endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    base = f"/v2/{options.endpoint_id}"

    @app.exception_handler(WorkerError)
    async def _worker_error(_request: Request, exc: WorkerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(InvalidRequest("; ".join(parts)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"No route {request.url.path}."))
        return error_response(
            WorkerError(str(exc.detail), status=exc.status_code, type="InvalidRequestError")
        )

    # async: FastAPI runs a plain ``def`` dependency in a thread pool, a thread hand-off for
    # every request (each stream POST from a worker among them)
    async def authorize(request: Request) -> None:
        if options.api_key and not key_matches(request, options.api_key):
            raise Unauthorized("Missing or wrong API key.")

    async def authorize_worker(request: Request) -> None:
        if not key_matches(request, pool.worker_key):
            raise Unauthorized("Worker webhooks need the worker key (RUNPOD_AI_API_KEY).")

    client = APIRouter(prefix=base, dependencies=[Depends(authorize)])
    hooks = APIRouter(prefix=base, dependencies=[Depends(authorize_worker)])

    def find(job_id: str) -> Job:
        job = store.get(job_id)
        if job is None:
            raise NotFound(f"No job {job_id!r} on endpoint {options.endpoint_id!r}.")
        return job

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

    # -- the webhooks runpod's SDK calls ---------------------------------------------------------

    def worker(worker_id: str) -> None:
        if not pool.seen(worker_id):
            raise NotFound(f"Unknown worker {worker_id!r}.")

    def job_of(worker_id: str, job_id: str) -> Job | None:
        """The job a worker posts for; None when its run is no longer that worker's (the job
        was retried since, and this is an old run's late output, which is dropped)."""
        worker(worker_id)
        job = find(job_id)
        return job if job.worker_id == worker_id else None

    async def take(request: Request, worker_id: str, count: int) -> list[Job]:
        """Hold the poll until there is work; a worker that hangs up (or died) takes nothing:
        jobs taken for a poll whose worker has gone go back to the front of the queue."""
        worker(worker_id)
        taking = asyncio.ensure_future(
            store.take(worker_id, count, options.take_timeout_s, lambda: pool.current(worker_id))
        )
        gone = asyncio.ensure_future(until_disconnected(request))
        with pool.polling(worker_id):
            await asyncio.wait([taking, gone], return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not taking.done():
            taking.cancel()
            return []
        jobs = taking.result()
        if jobs and (gone.done() or await request.is_disconnected()):
            store.put_back(jobs)
            return []
        return jobs

    @hooks.get("/job-take/{worker_id}")
    async def job_take(worker_id: str, request: Request) -> Response:
        jobs = encode_taken(store, await take(request, worker_id, 1))
        if not jobs:
            return Response(status_code=204)
        return Response(jobs[0], media_type="application/json")

    @hooks.get("/job-take-batch/{worker_id}")
    async def job_take_batch(
        worker_id: str, request: Request, batch_size: Annotated[int, Query(ge=1, le=1024)] = 1
    ) -> Response:
        jobs = encode_taken(store, await take(request, worker_id, batch_size))
        if not jobs:
            return Response(status_code=204)
        return Response(b"[" + b",".join(jobs) + b"]", media_type="application/json")

    async def worker_output(request: Request, job: Job) -> Any:
        """A worker's POST body; one that clients could not be given as JSON fails the job."""
        try:
            return await read_json(request, MAX_RUNSYNC_BYTES)
        except InvalidRequest as exc:
            message = f"The worker's output cannot be relayed: {exc.message}"
            store.fail(job, job_error(WorkerError(message))["error"])
            return None

    @hooks.post("/job-stream/{worker_id}/{job_id}")
    async def job_stream(worker_id: str, job_id: str, request: Request) -> dict[str, Any]:
        job = job_of(worker_id, job_id)
        if job is None:
            return {"ok": True}
        payload = await worker_output(request, job)
        half_delay = options.stream_post_delay_ms / 2000
        if half_delay:
            await asyncio.sleep(half_delay)
        store.add_output(job, payload.get("output") if isinstance(payload, dict) else payload)
        if half_delay:
            await asyncio.sleep(half_delay)
        return {"ok": True}

    @hooks.post("/job-done/{worker_id}/{job_id}")
    async def job_done(worker_id: str, job_id: str, request: Request) -> dict[str, Any]:
        job = job_of(worker_id, job_id)
        if job is None:
            return {"ok": True}
        payload = await worker_output(request, job)
        if job.final:
            return {"ok": True}
        if not isinstance(payload, dict):
            raise InvalidRequest("job-done: the body must be a JSON object")
        store.complete(job, payload)
        return {"ok": True}

    @hooks.get("/job-stop/{worker_id}")
    async def job_stop(worker_id: str) -> Response:
        worker(worker_id)
        job_ids = await store.stop_signals(worker_id, options.take_timeout_s)
        if not job_ids:
            return Response(status_code=204)
        return JSONResponse({"jobsToStop": job_ids})

    @hooks.get("/ping/{worker_id}")
    async def ping(worker_id: str) -> dict[str, Any]:
        worker(worker_id)
        return {"ok": True}

    # -- the local endpoint's own ----------------------------------------------------------------

    app.include_router(client)
    app.include_router(hooks)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/local/workers", dependencies=[Depends(authorize)])
    async def workers() -> list[dict[str, object]]:
        return pool.describe()

    return app


def encode_taken(store: JobStore, jobs: list[Job]) -> list[bytes]:
    """Each taken job as JSON for its worker; one that cannot be encoded is failed with an error
    instead of breaking the answer (runpod would drop the whole batch, and its jobs be lost)."""
    encoded = []
    for job in jobs:
        try:
            encoded.append(encode_json({"id": job.id, "input": job.input}))
        except (ValueError, RecursionError):
            store.fail(job, job_error(InvalidRequest(UNCARRYABLE))["error"])
    return encoded


def key_matches(request: Request, key: str) -> bool:
    """``Authorization: Bearer KEY`` (clients), the bare key (runpod's worker SDK sends
    ``RUNPOD_AI_API_KEY`` as it is), or ``x-api-key: KEY`` (Anthropic's SDKs)."""
    given = request.headers.get("authorization", "").strip().removeprefix("Bearer ").strip()
    given = given or request.headers.get("x-api-key", "").strip()
    return hmac.compare_digest(given.encode(), key.encode())


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
