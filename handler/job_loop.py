"""runpod's production job loop, with a taken job started at once and a bounded SIGTERM drain.

runpod 1.10's ``JobScaler`` is kept for everything it does well (job-take, the stop-signal poll,
per-job stop, concurrency, its SIGTERM handler). :class:`PromptJobScaler` changes two things:

* **Start**: ``run_jobs`` looked at its queue of taken jobs every 100 ms (``asyncio.sleep(0.1)``
  when idle, ``asyncio.wait(..., timeout=0.1)`` while jobs run), so every job waited 50 ms on
  average between its job-take answer and the handler: most of the worker's time-to-first-token
  overhead in ``make bench``. Here the loop waits on the queue, the running jobs and the shutdown
  together, and starts a job the moment it is queued.
* **Take**: runpod's ``get_jobs`` recorded each taken job in its in-flight list (one write of
  ``.runpod_jobs.pkl`` per job, about 0.8 ms here) and then yielded to the loop, so the jobs it
  had just taken started before it sent the next job-take. When 16 requests arrive together the
  first job-take answer holds some of them, and the rest waited in the endpoint's queue for that
  (26 ms in ``bench/burst_timeline.py``): the engine then got them in two steps apart. Here a
  taken batch is queued, recorded with one write, and the next job-take goes out at once (asking
  for the places left: jobs taken, queued or running, counted once).
* **SIGTERM**: runpod stopped the job-take loop only after its held long-poll returned (so a job
  could still be taken after SIGTERM), then waited for in-flight jobs without limit. Here the
  held job-take is cancelled at once, in-flight jobs get ``shutdown_grace_s`` to finish, and any
  still running are cancelled (which aborts their engine requests) and reported as failed with a
  503 error, so their callers learn at once instead of waiting on a job nobody runs.

* **Loop**: runpod ran the job loop on a loop of its own (``asyncio.run`` in the main thread).
  Given the engine's loop, the scaler runs there instead, and the main thread only waits for it
  (runpod's signal handlers still run there and hand the stop to the loop): a job then calls
  vLLM's app on the loop vLLM's output handler runs on, as uvicorn does under ``vllm serve``,
  instead of crossing threads (and waiting for the GIL) for every event.

* **Results**: runpod's ``handle_job`` POSTs each value the handler yields through
  ``rp_http.stream_result``, which builds an aiohttp_retry ``RetryClient`` per POST, formats the
  whole value into two debug messages that are never shown, and sets the job's ``X-Request-ID``
  on the session every job shares. Stream POSTs are most of what the worker's loop does besides
  vLLM (``py-spy`` at 16 streams), and that loop is vLLM's. :func:`handle_job` posts the same
  bodies to the same URLs with the same headers, from one aiohttp request each, the request id
  in that request's own headers; a 5xx answer (or a connection that could not be made) is tried
  again, as runpod's retry did for 5xx, and a result that cannot be encoded fails the job
  instead of leaving it unreported. The handler's generator is closed when the job is stopped,
  so its engine request is aborted then, not when the generator is collected.

And one thing around it: runpod's ``JobsProgress`` pickles every in-flight job, input included,
to ``./.runpod_jobs.pkl`` on each job's start and finish (its heartbeat process reads the job ids
from there). :class:`JobIds` hands it the job id only, so no prompt reaches the disk and the
file stays a few bytes per job however long the prompts.

:func:`start` installs it and runs ``runpod.serverless.start``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import signal
import sys
from typing import Any

import aiohttp
import runpod
from runpod.http_client import AsyncClientSession, ClientSession, TooManyRequests
from runpod.serverless.modules import rp_http, rp_job, rp_scale
from runpod.serverless.modules.worker_state import JobsProgress

from handler.errors import ShuttingDown, job_error

log = logging.getLogger("handler.job_loop")

# Re-checks the queue this often even with nothing to wake the loop (runpod's set_scale swaps
# the queue object when the concurrency changes).
_RECHECK_S = 1.0
GRACE_KEY = "shutdown_grace_s"
LOOP_KEY = "event_loop"


class JobIds:
    """runpod's ``JobsProgress`` as the scaler uses it, given job ids instead of whole jobs."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress

    def add(self, job: Any) -> None:
        self._progress.add(_job_id(job))

    def add_all(self, jobs: list[Any]) -> None:
        """Record a taken batch with one write of the state file, not one per job."""
        from runpod.serverless.modules.worker_state import Job

        set.update(self._progress, (Job(id=_job_id(job)) for job in jobs))
        self._progress._save_state()  # runpod 1.10's (pinned) own save, once

    def remove(self, job: Any) -> None:
        self._progress.remove(_job_id(job))

    def get_job_count(self) -> int:
        return int(self._progress.get_job_count())

    def get_job_list(self) -> str | None:
        return self._progress.get_job_list()  # type: ignore[no-any-return]


def _job_id(job: Any) -> Any:
    return str(job["id"]) if isinstance(job, dict) else job


class PromptJobScaler(rp_scale.JobScaler):  # type: ignore[misc]
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.job_progress = JobIds(JobsProgress())  # runpod's singleton
        self.shutdown_grace_s = float(config.get(GRACE_KEY, 30.0))
        self._loop: asyncio.AbstractEventLoop | None = config.get(LOOP_KEY)
        self._jobs: dict[str, dict[str, Any]] = {}
        self.jobs_handler = handle_job

    def start(self) -> None:
        """runpod's start, on the given loop (running in another thread) if there is one."""
        if self._loop is None:
            super().start()
            return
        sys.excepthook = rp_scale._handle_uncaught_exception
        signal.signal(signal.SIGTERM, self.handle_shutdown)
        signal.signal(signal.SIGINT, self.handle_shutdown)
        running = asyncio.run_coroutine_threadsafe(self.run(), self._loop)
        while True:  # a wait with a timeout, so the signal handlers run promptly
            with contextlib.suppress(concurrent.futures.TimeoutError):
                running.result(timeout=_RECHECK_S)
                return

    def handle_shutdown(self, signum: int, frame: Any) -> None:
        """runpod's: stop taking jobs, drain the rest. Signal handlers run in the main thread;
        the shutdown event belongs to the loop the scaler runs on."""
        if self._loop is None:
            super().handle_shutdown(signum, frame)
            return
        with contextlib.suppress(RuntimeError):  # the loop has stopped: nothing left to stop
            self._loop.call_soon_threadsafe(self.kill_worker)

    async def run(self) -> None:
        async with AsyncClientSession() as session:
            taking = asyncio.create_task(self.get_jobs(session))
            running = asyncio.create_task(self.run_jobs(session))
            stops = asyncio.create_task(self.monitor_stop_signals(session))
            stopping = asyncio.ensure_future(self._shutdown_event.wait())
            # a loop that fails stops the worker, as runpod's gather would
            await asyncio.wait([stopping, taking, running], return_when=asyncio.FIRST_COMPLETED)
            self.kill_worker()
            taking.cancel()  # its held long-poll would still take a job
            await asyncio.gather(taking, return_exceptions=True)  # and its connection closed
            log.info(
                "stopping: no more jobs are taken; %d running get %.0f s to finish",
                len(self._jobs),
                self.shutdown_grace_s,
            )
            if not (await asyncio.wait([running], timeout=self.shutdown_grace_s))[0]:
                await self._fail_running(session)
            stops.cancel()
            await asyncio.gather(taking, stops, return_exceptions=True)
            await running  # raises what made run_jobs fail, if anything did

    def current_occupancy(self) -> int:
        """Jobs taken and not finished. runpod's in-flight list holds each from its take to its
        end; runpod's own count added the queued ones a second time, which here (the next take
        is asked for while a batch is still queued) would ask for too few, or none."""
        return int(self.job_progress.get_job_count())

    async def get_jobs(self, session: ClientSession) -> None:
        """runpod's job-take loop, with each taken batch queued and recorded at once (one
        state-file write) and the next job-take sent before anything else runs."""
        while self.is_alive():
            await self.set_scale()
            needed = self.current_concurrency - self.current_occupancy()
            if needed <= 0:
                await asyncio.sleep(1)  # runpod's: the queue is full, retry soon
                continue
            try:
                jobs = await asyncio.wait_for(
                    self.jobs_fetcher(session, needed), timeout=self.jobs_fetcher_timeout
                )
            except TooManyRequests:
                await asyncio.sleep(5)  # runpod's debounce
                continue
            except (TimeoutError, TypeError):
                continue  # runpod's: a held job-take that timed out, or an answer it cannot read
            except Exception as error:
                log.error("job-take failed: %s", type(error).__name__)
                await asyncio.sleep(0)
                continue
            for job in jobs or []:
                await self.jobs_queue.put(job)  # no wait: no more than the free places were asked
            if jobs:
                self.job_progress.add_all(jobs)

    async def run_jobs(self, session: ClientSession) -> None:
        tasks: set[asyncio.Task[Any]] = set()
        stopping = asyncio.ensure_future(self._shutdown_event.wait())
        try:
            while self.is_alive() or not self.jobs_queue.empty():
                while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                    self._begin(session, self.jobs_queue.get_nowait(), tasks)
                getter = None
                waits: set[asyncio.Future[Any]] = set(tasks)
                if len(tasks) < self.current_concurrency:
                    getter = asyncio.ensure_future(self.jobs_queue.get())
                    waits.add(getter)
                if self.is_alive():
                    waits.add(stopping)
                done, _ = await asyncio.wait(
                    waits, timeout=_RECHECK_S, return_when=asyncio.FIRST_COMPLETED
                )
                tasks.difference_update(done)
                if getter is not None:
                    job = await _settle(getter)
                    if job is not None:
                        self._begin(session, job, tasks)
        finally:
            stopping.cancel()
        # as runpod: a stopped job's CancelledError is expected, any other failure is logged
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("job failed during the shutdown drain: %r", result)

    def _begin(self, session: ClientSession, job: dict[str, Any], tasks: set[Any]) -> None:
        task = asyncio.create_task(self.handle_job(session, job))
        tasks.add(task)
        self.jobs_tasks[job["id"]] = task
        self._jobs[job["id"]] = job
        task.add_done_callback(lambda _: self._jobs.pop(job["id"], None))

    async def _fail_running(self, session: ClientSession) -> None:
        """Cancel the jobs still running after the grace period and report each as failed."""
        left = [(self._jobs[i], task) for i, task in self.jobs_tasks.items() if i in self._jobs]
        grace = self.shutdown_grace_s
        log.warning("%d job(s) still running %.0f s after SIGTERM: failing them", len(left), grace)
        for _, task in left:
            task.cancel()
        await asyncio.gather(*(task for _, task in left), return_exceptions=True)
        error = job_error(ShuttingDown(self.shutdown_grace_s))
        await asyncio.gather(*(post_result(session, job, error, DONE) for job, _ in left))


# Where a result goes: runpod's webhook URLs (from RUNPOD_WEBHOOK_POST_STREAM and
# RUNPOD_WEBHOOK_POST_OUTPUT, read by runpod at import) and the isStream flag runpod appends.
STREAM, DONE = "stream", "done"
_POST_ATTEMPTS = 3
_RETRY_WAIT_S = (1.0, 2.0)  # before the second and third attempts, as runpod's Fibonacci waits
# runpod's headers for results, kept as they are for RunPod's servers
_RESULT_HEADERS = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}


def result_url(job: dict[str, Any], kind: str, *, streamed: bool = False) -> str:
    """The webhook a job's stream chunk (``STREAM``) or final result (``DONE``) goes to."""
    template = rp_http.JOB_STREAM_URL if kind == STREAM else rp_http.JOB_DONE_URL
    flag = "true" if streamed and kind == DONE else "false"
    return f"{template.replace('$ID', str(job['id']))}&isStream={flag}"


async def post_result(
    session: ClientSession,
    job: dict[str, Any],
    data: dict[str, Any],
    kind: str,
    *,
    streamed: bool = False,
) -> bool:
    """POST one result; False (logged) when it could not be delivered. Raises only for data
    that JSON cannot carry (ValueError, TypeError, RecursionError)."""
    body = json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
    url = result_url(job, kind, streamed=streamed)
    headers = {**_RESULT_HEADERS, "X-Request-ID": job["id"]}
    for attempt in range(_POST_ATTEMPTS):
        if attempt:
            await asyncio.sleep(_RETRY_WAIT_S[attempt - 1])
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status < 500:
                    if response.status >= 400:
                        log.error("job %s: its %s POST got %d", job["id"], kind, response.status)
                    return bool(response.status < 400)
                problem = f"status {response.status}"
        except aiohttp.ClientConnectorError as exc:  # nothing was sent: safe to try again
            problem = type(exc).__name__
        except (aiohttp.ClientError, TimeoutError) as exc:  # it may have arrived: not sent twice
            log.error("job %s: its %s POST failed: %s", job["id"], kind, type(exc).__name__)
            return False
    log.error("job %s: its %s POST failed %d times (%s)", job["id"], kind, _POST_ATTEMPTS, problem)
    return False


async def handle_job(session: ClientSession, config: dict[str, Any], job: dict[str, Any]) -> None:
    """runpod's ``rp_job.handle_job`` for an async-generator handler: each value it yields goes
    out as one stream POST (and, with ``return_aggregate_stream``, into the final output); a
    value with an ``error`` ends the job as failed; then the final result. Anything else
    (a plain handler, runpod's ``--rp_debugger``) is runpod's own."""
    handler = config["handler"]
    if not inspect.isasyncgenfunction(handler) or config.get("rp_args", {}).get("rp_debugger"):
        await rp_job.handle_job(session, config, job)
        return
    outputs: list[Any] = []
    result: dict[str, Any] = {"output": outputs}
    try:
        async with contextlib.aclosing(handler(job)) as values:
            async for value in values:
                if isinstance(value, dict) and value.get("error"):
                    result = {"error": str(value["error"])}
                    break
                if config.get("return_aggregate_stream", False):
                    outputs.append(value)
                await post_result(session, job, {"output": value}, STREAM)
    except Exception as exc:  # a value JSON cannot carry, or a handler that raised: never lost
        log.error("job %s: failed while streaming: %s", job["id"], type(exc).__name__)
        result = job_error(exc)
    if config.get("refresh_worker", False):
        result["stopPod"] = True
    try:
        await post_result(session, job, result, DONE, streamed=True)
    except (ValueError, TypeError, RecursionError) as exc:
        log.error("job %s: its result could not be encoded: %s", job["id"], type(exc).__name__)
        await post_result(session, job, job_error(exc), DONE, streamed=True)


async def _settle(getter: asyncio.Future[Any]) -> Any:
    """The job a pending ``queue.get()`` took, or None once it is cancelled without one (a
    cancelled get leaves its item in the queue)."""
    if not getter.done():
        getter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await getter
    return None


def start(
    config: dict[str, Any],
    shutdown_grace_s: float,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """``runpod.serverless.start`` with :class:`PromptJobScaler` as its job loop, run on
    ``loop`` (the engine's) if given, else on a loop of its own."""
    rp_scale.JobScaler = PromptJobScaler
    runpod.serverless.start({**config, GRACE_KEY: shutdown_grace_s, LOOP_KEY: loop})
