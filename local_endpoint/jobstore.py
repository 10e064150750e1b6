"""The local endpoint's job queue and job records, shared by its client and worker sides.

A job goes IN_QUEUE -> IN_PROGRESS (a worker took it) -> COMPLETED | FAILED | CANCELLED |
TIMED_OUT, as on RunPod (its job states and job operations):

* A final state is final. A FAILED or TIMED_OUT job runs again only when a client asks
  (:meth:`JobStore.retry`, RunPod's ``/retry``): its output and error are removed and it goes to
  the back of the queue. Nothing is retried on its own, so a client sees every failure here as it
  would on RunPod.
* A worker that fails a job as unavailable (a 503 ``ServiceUnavailableError``: its engine died, or
  it is shutting down) is going away: it is handed nothing more.
* Time limits (:meth:`JobStore.sweep`): a job running longer than its execution timeout is
  TIMED_OUT and stopped in its worker; so is a job not ended when its TTL (counted from
  submission) passes. A final job is forgotten once its result retention has passed (30 min for
  ``/run``, 1 min for ``/runsync``): then it is unknown (404) to every operation, ``/retry``
  included. (RunPod deletes a job's data at its TTL whatever its state; here a job that timed out
  keeps its TIMED_OUT status for the retention period, so a client polling sees why it ended.)

Workers long-poll :meth:`JobStore.take` and :meth:`JobStore.stop_signals`; clients wait on
:meth:`JobStore.wait` for a job to change (a streamed chunk, a final state). Nothing here does I/O:
the HTTP layer (``local_endpoint.client_routes``, ``local_endpoint.worker_routes``) calls these
methods, and tests call them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT})
RETRYABLE = frozenset({Status.FAILED, Status.TIMED_OUT})
# RunPod's: results of /run are kept 30 minutes after the job ends, of /runsync 1 minute; a job
# lives at most its TTL (24 h unless its policy says otherwise); a job runs at most its execution
# timeout (the endpoint's 600 s unless its policy says otherwise).
RUN_RETENTION_S = 1800.0
RUNSYNC_RETENTION_S = 60.0
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_EXECUTION_TIMEOUT_S = 600.0
SWEEP_S = 0.5  # how often time limits are checked


class NotRetryable(Exception):
    """/retry of a job that is not FAILED or TIMED_OUT."""


def timeout_error(message: str) -> str:
    """A TIMED_OUT job's error, the OpenAI error object as JSON (as workers fail jobs)."""
    body = {"message": message, "type": "TimeoutError", "param": None, "code": 504}
    return json.dumps({"error": body})


def unavailable(error: str) -> bool:
    """A worker's job error that says the worker itself cannot serve (the OpenAI error object as
    JSON, type ``ServiceUnavailableError``), rather than anything about the request."""
    try:
        parsed = json.loads(error)
    except ValueError:
        return False
    body = parsed.get("error") if isinstance(parsed, dict) else None
    return isinstance(body, dict) and body.get("type") == "ServiceUnavailableError"


class Signal:
    """Wakes every coroutine waiting at the moment :meth:`fire` is called."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, wait_s: float) -> None:
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), wait_s)


@dataclass
class Limits:
    """How long a job may run once taken, live in all, and keep its result once final."""

    execution_timeout_s: float = DEFAULT_EXECUTION_TIMEOUT_S
    ttl_s: float = DEFAULT_TTL_S
    retention_s: float = RUN_RETENTION_S


@dataclass
class Job:
    id: str
    input: Any
    created: float
    limits: Limits = field(default_factory=Limits)
    status: Status = Status.IN_QUEUE
    worker_id: str | None = None
    started: float | None = None
    finished: float | None = None
    first_output: float | None = None
    output: Any = None
    error: str | None = None
    stream: list[Any] = field(default_factory=list)
    stream_read: int = 0  # chunks already handed out by the client's /stream
    stream_posts: int = 0
    retries: int = 0
    changed: Signal = field(default_factory=Signal)

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True)
class Observer:
    """Callbacks for metrics; each gets the job at the moment of the transition."""

    taken: Callable[[Job], None] = lambda job: None
    first_output: Callable[[Job], None] = lambda job: None
    finished: Callable[[Job], None] = lambda job: None


class JobStore:
    def __init__(
        self,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.closed = False
        self._observer = observer or Observer()
        self._clock = clock
        self._pending: deque[str] = deque()
        self._work = Signal()
        self._stops: dict[str, list[str]] = {}
        self._stop_signal: dict[str, Signal] = {}
        self._going_away: set[str] = set()  # workers that reported themselves unavailable
        self.totals: dict[Status, int] = dict.fromkeys(FINAL, 0)
        self.retried = 0

    # -- client side -------------------------------------------------------------------------

    def submit(self, job_input: Any, limits: Limits | None = None) -> Job:
        self.sweep()
        job = Job(
            id=f"local-{uuid.uuid4()}",
            input=job_input,
            created=self._clock(),
            limits=limits or Limits(),
        )
        self.jobs[job.id] = job
        self._pending.append(job.id)
        self._work.fire()
        return job

    def retry(self, job: Job) -> None:
        """RunPod's /retry: a FAILED or TIMED_OUT job, its output and error removed, queued
        again (at the back) for a new run. Anything else raises :class:`NotRetryable`."""
        if job.status not in RETRYABLE:
            raise NotRetryable(
                f"Job {job.id!r} is {job.status.value}; only FAILED or TIMED_OUT jobs can be "
                "retried."
            )
        job.status, job.worker_id, job.started, job.finished = Status.IN_QUEUE, None, None, None
        job.first_output, job.output, job.error = None, None, None
        job.stream, job.stream_read, job.stream_posts = [], 0, 0
        for stops in self._stops.values():  # a stop meant for the old run, not yet collected
            while job.id in stops:
                stops.remove(job.id)
        job.retries += 1
        self.retried += 1
        self._pending.append(job.id)
        job.changed.fire()
        self._work.fire()

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """A queued job never runs; a running one is signalled to its worker, which stops it."""
        if job.final:
            return
        if job.status is Status.IN_QUEUE:
            self._pending.remove(job.id)
        else:
            self._stop_in_worker(job)
        self._finish(job, Status.CANCELLED)

    def purge(self) -> int:
        """Cancel every queued job (RunPod's purge-queue)."""
        queued = [self.jobs[job_id] for job_id in self._pending]
        for job in queued:
            self.cancel(job)
        return len(queued)

    async def wait(self, job: Job, wait_s: float) -> None:
        """Return when ``job`` changes (output arrived, state moved) or after ``wait_s``."""
        if not job.final:
            await job.changed.wait(wait_s)

    def read_stream(self, job: Job) -> list[Any]:
        """The chunks not handed out before (RunPod's /stream is incremental)."""
        chunks = job.stream[job.stream_read :]
        job.stream_read = len(job.stream)
        return chunks

    # -- worker side -------------------------------------------------------------------------

    async def take(
        self,
        worker_id: str,
        count: int,
        hold_s: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> list[Job]:
        """Up to ``count`` queued jobs for ``worker_id``, waiting up to ``hold_s`` for one.
        Nothing is handed to a worker for which ``alive()`` is false by the time work comes."""
        deadline = self._clock() + hold_s
        while not self._pending and not self.closed:
            left = deadline - self._clock()
            if left <= 0:
                return []
            await self._work.wait(left)
        if self.closed or not alive() or worker_id in self._going_away:
            return []
        taken: list[Job] = []
        while self._pending and len(taken) < count:
            job = self.jobs[self._pending.popleft()]
            job.status, job.worker_id, job.started = Status.IN_PROGRESS, worker_id, self._clock()
            self._observer.taken(job)
            job.changed.fire()
            taken.append(job)
        return taken

    def put_back(self, jobs: list[Job]) -> None:
        """Jobs :meth:`take` handed to a poll that could not deliver them (its worker hung up):
        queued again at the front, in their order, as if never taken."""
        for job in reversed(jobs):
            if job.status is not Status.IN_PROGRESS:
                continue
            job.status, job.worker_id, job.started = Status.IN_QUEUE, None, None
            self._pending.appendleft(job.id)
            job.changed.fire()
        self._work.fire()

    def add_output(self, job: Job, output: Any) -> None:
        """One stream POST from the worker. Late chunks of a cancelled job are dropped."""
        job.stream_posts += 1
        if job.final:
            return
        job.stream.append(output)
        self._mark_first_output(job)
        job.changed.fire()

    def complete(self, job: Job, result: dict[str, Any]) -> None:
        """The worker's job-done POST: ``{"output": ...}`` or ``{"error": "..."}``."""
        if job.final:
            return
        if result.get("error"):
            error = str(result["error"])
            if unavailable(error) and job.worker_id is not None:
                self._going_away.add(job.worker_id)
            job.error = error
            self._finish(job, Status.FAILED)
            return
        job.output = result.get("output")
        self._mark_first_output(job)
        self._finish(job, Status.COMPLETED)

    def fail(self, job: Job, error: str) -> None:
        """The endpoint itself fails a job it cannot run or relay (``error`` as the worker's)."""
        if job.final:
            return
        if job.status is Status.IN_QUEUE:
            self._pending.remove(job.id)
        job.error = error
        self._finish(job, Status.FAILED)

    async def stop_signals(self, worker_id: str, hold_s: float) -> list[str]:
        """Job ids ``worker_id`` must stop, waiting up to ``hold_s`` for one."""
        if not self._stops.get(worker_id) and not self.closed:
            await self._signal_for(worker_id).wait(hold_s)
        return self._stops.pop(worker_id, [])

    def fail_worker_jobs(self, worker_id: str, message: str) -> int:
        """A worker process went away: its unfinished jobs fail with ``message``."""
        lost = [
            job
            for job in self.jobs.values()
            if job.worker_id == worker_id and job.status is Status.IN_PROGRESS
        ]
        for job in lost:
            job.error = message
            self._finish(job, Status.FAILED)
        self._stops.pop(worker_id, None)
        return len(lost)

    def close(self) -> list[Job]:
        """Stop handing out work: every long-poll returns now; queued jobs are cancelled."""
        self.closed = True
        queued = [self.jobs[job_id] for job_id in self._pending]
        for job in queued:
            self.cancel(job)
        self._work.fire()
        for signal in self._stop_signal.values():
            signal.fire()
        return queued

    # -- counts --------------------------------------------------------------------------------

    def counts(self) -> dict[Status, int]:
        """Jobs now queued and running, and the totals that reached each final state."""
        running = sum(1 for job in self.jobs.values() if job.status is Status.IN_PROGRESS)
        return {Status.IN_QUEUE: len(self._pending), Status.IN_PROGRESS: running, **self.totals}

    def running_on(self, worker_id: str) -> int:
        return sum(
            1
            for job in self.jobs.values()
            if job.worker_id == worker_id and job.status is Status.IN_PROGRESS
        )

    # -- helpers -------------------------------------------------------------------------------

    def _signal_for(self, worker_id: str) -> Signal:
        return self._stop_signal.setdefault(worker_id, Signal())

    def _mark_first_output(self, job: Job) -> None:
        if job.first_output is None:
            job.first_output = self._clock()
            self._observer.first_output(job)

    def _finish(self, job: Job, status: Status) -> None:
        job.status, job.finished = status, self._clock()
        self.totals[status] += 1
        self._observer.finished(job)
        job.changed.fire()

    def _stop_in_worker(self, job: Job) -> None:
        if job.worker_id is not None:
            self._stops.setdefault(job.worker_id, []).append(job.id)
            self._signal_for(job.worker_id).fire()

    def _time_out(self, job: Job, message: str) -> None:
        if job.status is Status.IN_QUEUE:
            self._pending.remove(job.id)
        elif job.status is Status.IN_PROGRESS:
            self._stop_in_worker(job)
        job.error = timeout_error(message)
        self._finish(job, Status.TIMED_OUT)

    def sweep(self) -> None:
        """Apply every job's time limits now (see the module docstring)."""
        now = self._clock()
        for job in list(self.jobs.values()):
            limits = job.limits
            timeout = limits.execution_timeout_s
            running = job.status is Status.IN_PROGRESS and job.started is not None
            if running and now >= (job.started or now) + timeout:
                self._time_out(job, f"The job ran past its execution timeout ({timeout:g} s).")
            if not job.final and now >= job.created + limits.ttl_s:
                self._time_out(job, f"The job's TTL ({limits.ttl_s:g} s) passed before it ended.")
            if job.final and job.finished is not None and now >= job.finished + limits.retention_s:
                del self.jobs[job.id]

    async def keep_time(self, every_s: float = SWEEP_S) -> None:
        """:meth:`sweep` every ``every_s`` until the store is closed."""
        while not self.closed:
            self.sweep()
            await asyncio.sleep(every_s)
