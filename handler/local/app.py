"""The local endpoint's HTTP surface, for one endpoint id, all under ``/v2/{id}``.

Client side (RunPod's public API): ``run``, ``runsync``, ``status``, ``stream`` (incremental),
``cancel``, ``purge-queue``, ``health``, and the OpenAI route ``openai/v1/...``, which turns a
request into a ``{"openai_route", "openai_input"}`` job and relays the worker's SSE text as it
arrives. Worker side (what runpod's SDK calls in production): ``job-take``, ``job-take-batch``,
``job-stream``, ``job-done``, ``job-stop``, ``ping``. Plus ``/metrics`` (Prometheus) and
``/local/workers`` (the worker processes and their metrics URLs).

Errors are OpenAI's error object, with the HTTP status in ``code``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from handler.errors import (
    InvalidRequest,
    NotFound,
    WorkerError,
    error_body,
    from_validation_error,
)
from handler.local.jobstore import Job, JobStore, Status
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
STREAM_POLL_S = 2.0  # how long /stream waits for new output before answering with none
WAIT_SLICE_S = 30.0


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Any
    webhook: str | None = None


class Unauthorized(WorkerError):
    status = 401
    type = "AuthenticationError"


def error_response(exc: WorkerError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status)


async def read_json(request: Request, limit: int) -> Any:
    raw = await request.body()
    if len(raw) > limit:
        raise WorkerError(
            f"Request body is {len(raw)} bytes; the limit is {limit}.",
            status=413,
            type="RequestTooLargeError",
        )
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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

    def authorize(request: Request) -> None:
        if options.api_key:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if given != options.api_key:
                raise Unauthorized("Missing or wrong API key.")

    client = APIRouter(prefix=base, dependencies=[Depends(authorize)])
    hooks = APIRouter(prefix=base)

    def find(job_id: str) -> Job:
        job = store.get(job_id)
        if job is None:
            raise NotFound(f"No job {job_id!r} on endpoint {options.endpoint_id!r}.")
        return job

    def submit(payload: Any) -> Job:
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
        return store.submit(run.input)

    # -- RunPod's public API ---------------------------------------------------------------------

    @client.post("/run")
    async def run(request: Request) -> dict[str, Any]:
        job = submit(await read_json(request, MAX_RUN_BYTES))
        return {"id": job.id, "status": job.status.value}

    @client.post("/runsync")
    async def runsync(
        request: Request, wait: Annotated[int, Query(ge=1000, le=300_000)] = 90_000
    ) -> dict[str, Any]:
        job = submit(await read_json(request, MAX_RUNSYNC_BYTES))
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

    @client.post("/purge-queue")
    async def purge_queue() -> dict[str, Any]:
        return {"removed": store.purge(), "status": "completed"}

    @client.get("/health")
    async def health() -> dict[str, Any]:
        counts = store.counts()
        return {
            "jobs": {
                "completed": counts[Status.COMPLETED],
                "failed": counts[Status.FAILED],
                "cancelled": counts[Status.CANCELLED],
                "inProgress": counts[Status.IN_PROGRESS],
                "inQueue": counts[Status.IN_QUEUE],
                "retried": 0,
            },
            "workers": pool.states(),
        }

    # -- RunPod's OpenAI-compatible route --------------------------------------------------------

    @client.api_route("/openai/{path:path}", methods=["GET", "POST"])
    async def openai(path: str, request: Request) -> Response:
        body = await read_json(request, MAX_RUNSYNC_BYTES) if request.method == "POST" else None
        job = submit({"input": openai_job_input("/" + path, body)})
        if wants_stream(body):
            await wait_until(store, job, lambda: bool(job.stream))
            if job.stream and isinstance(job.stream[0], str):
                return StreamingResponse(
                    relay(store, job),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
        await wait_until(store, job, lambda: job.final)
        return one_shot_response(job)

    # -- the webhooks runpod's SDK calls ---------------------------------------------------------

    def worker(worker_id: str) -> None:
        if not pool.seen(worker_id):
            raise NotFound(f"Unknown worker {worker_id!r}.")

    def job_of(worker_id: str, job_id: str) -> Job:
        worker(worker_id)
        return find(job_id)

    async def take(request: Request, worker_id: str, count: int) -> list[Job]:
        """Hold the poll until there is work; a worker that hangs up (or died) takes nothing."""
        worker(worker_id)
        taking = asyncio.ensure_future(
            store.take(worker_id, count, options.take_timeout_s, lambda: pool.current(worker_id))
        )
        gone = asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait([taking, gone], return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not taking.done():
            taking.cancel()
            return []
        return taking.result()

    @hooks.get("/job-take/{worker_id}")
    async def job_take(worker_id: str, request: Request) -> Response:
        jobs = await take(request, worker_id, 1)
        if not jobs:
            return Response(status_code=204)
        return JSONResponse({"id": jobs[0].id, "input": jobs[0].input})

    @hooks.get("/job-take-batch/{worker_id}")
    async def job_take_batch(
        worker_id: str, request: Request, batch_size: Annotated[int, Query(ge=1, le=1024)] = 1
    ) -> Response:
        jobs = await take(request, worker_id, batch_size)
        if not jobs:
            return Response(status_code=204)
        return JSONResponse([{"id": job.id, "input": job.input} for job in jobs])

    @hooks.post("/job-stream/{worker_id}/{job_id}")
    async def job_stream(worker_id: str, job_id: str, request: Request) -> dict[str, Any]:
        job = job_of(worker_id, job_id)
        payload = await read_json(request, MAX_RUNSYNC_BYTES)
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
        payload = await read_json(request, MAX_RUNSYNC_BYTES)
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

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/local/workers")
    async def workers() -> list[dict[str, object]]:
        return pool.describe()

    return app


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
