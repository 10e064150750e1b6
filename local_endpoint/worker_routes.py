"""The webhooks runpod's SDK calls in production, under ``/v2/{id}``: ``job-take``,
``job-take-batch``, ``job-stream``, ``job-done``, ``job-stop``, ``ping``. A job-take is held until
there is work (jobs taken for a poll whose worker has gone go back to the front of the queue), and
a post from a worker the job no longer belongs to (an old run of a retried job) is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from handler.errors import InvalidRequest, NotFound, WorkerError, job_error
from local_endpoint.bodies import (
    MAX_RUNSYNC_BYTES,
    UNCARRYABLE,
    encode_json,
    read_json,
    until_disconnected,
)
from local_endpoint.client_routes import find_job
from local_endpoint.jobstore import Job, JobStore
from local_endpoint.options import Options
from local_endpoint.workers import WorkerPool


def worker_router(
    options: Options, store: JobStore, pool: WorkerPool, dependencies: Sequence[Depends]
) -> APIRouter:
    hooks = APIRouter(prefix=f"/v2/{options.endpoint_id}", dependencies=dependencies)

    def find(job_id: str) -> Job:
        return find_job(store, options, job_id)

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

    return hooks


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
