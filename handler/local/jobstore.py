"""The local endpoint's job queue and job records, shared by its client and worker sides.

A job goes IN_QUEUE -> IN_PROGRESS (a worker took it) -> COMPLETED | FAILED | CANCELLED, as on
RunPod. A worker that fails a job as unavailable (a 503 ``ServiceUnavailableError``: its engine
died, or it is shutting down) before the job produced any output is going away: the job goes back
to the front of the queue for another worker (at most :data:`MAX_RETRIES` times; /health counts
them as ``retried``), and that worker is handed nothing more.

Workers long-poll :meth:`JobStore.take` and :meth:`JobStore.stop_signals`; clients wait on
:meth:`JobStore.wait` for a job to change (a streamed chunk, a final state). Nothing here does I/O:
the HTTP layer (``handler.local.app``) calls these methods, and tests call them directly.
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


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
MAX_RETRIES = 2  # a job that takes its worker's engine down each time fails after this many


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
class Job:
    id: str
    input: Any
    created: float
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
        retention_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.closed = False
        self._observer = observer or Observer()
        self._retention_s = retention_s
        self._clock = clock
        self._pending: deque[str] = deque()
        self._work = Signal()
        self._stops: dict[str, list[str]] = {}
        self._stop_signal: dict[str, Signal] = {}
        self._going_away: set[str] = set()  # workers that reported themselves unavailable
        self.totals: dict[Status, int] = dict.fromkeys(FINAL, 0)
        self.retried = 0

    # -- client side -------------------------------------------------------------------------

    def submit(self, job_input: Any) -> Job:
        self._forget_old()
        job = Job(id=f"local-{uuid.uuid4()}", input=job_input, created=self._clock())
        self.jobs[job.id] = job
        self._pending.append(job.id)
        self._work.fire()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """A queued job never runs; a running one is signalled to its worker, which stops it."""
        if job.final:
            return
        if job.status is Status.IN_QUEUE:
            self._pending.remove(job.id)
        elif job.worker_id is not None:
            self._stops.setdefault(job.worker_id, []).append(job.id)
            self._signal_for(job.worker_id).fire()
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
                if not job.stream and job.retries < MAX_RETRIES:
                    self._requeue(job)
                    return
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

    def _requeue(self, job: Job) -> None:
        job.status, job.worker_id, job.started = Status.IN_QUEUE, None, None
        job.retries += 1
        self.retried += 1
        self._pending.appendleft(job.id)
        job.changed.fire()
        self._work.fire()

    def _mark_first_output(self, job: Job) -> None:
        if job.first_output is None:
            job.first_output = self._clock()
            self._observer.first_output(job)

    def _finish(self, job: Job, status: Status) -> None:
        job.status, job.finished = status, self._clock()
        self.totals[status] += 1
        self._observer.finished(job)
        job.changed.fire()

    def _forget_old(self) -> None:
        """Drop final jobs older than the retention period (RunPod keeps results for a while)."""
        horizon = self._clock() - self._retention_s
        stale = [
            job_id
            for job_id, job in self.jobs.items()
            if job.final and job.finished is not None and job.finished < horizon
        ]
        for job_id in stale:
            del self.jobs[job_id]
