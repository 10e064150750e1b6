"""runpod's production job loop, with a job started the moment it is taken.

runpod 1.10's ``JobScaler.run_jobs`` looks at its queue of taken jobs every 100 ms (an
``asyncio.sleep(0.1)`` when idle, ``asyncio.wait(..., timeout=0.1)`` while jobs run), so every
job waited 50 ms on average, up to 100 ms, between its job-take answer and the handler: most of
the worker's time-to-first-token overhead (``make bench``). :class:`PromptJobScaler` keeps
everything else of runpod's loop (job-take, the stop-signal poll, per-job stop, SIGTERM drain,
concurrency) and replaces only that loop with one that waits on the queue, the running jobs and
the shutdown together. :func:`start` installs it and runs ``runpod.serverless.start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import runpod
from aiohttp import ClientSession
from runpod.serverless.modules import rp_scale

log = logging.getLogger("handler.job_loop")

# Re-checks the queue this often even with nothing to wake the loop (runpod's set_scale swaps
# the queue object when the concurrency changes).
_RECHECK_S = 1.0


class PromptJobScaler(rp_scale.JobScaler):  # type: ignore[misc]
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
        # as runpod: the SIGTERM drain lets running jobs finish; a stopped job's CancelledError
        # is expected, any other failure is logged
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("job failed during the shutdown drain: %r", result)

    def _begin(self, session: ClientSession, job: dict[str, Any], tasks: set[Any]) -> None:
        task = asyncio.create_task(self.handle_job(session, job))
        tasks.add(task)
        self.jobs_tasks[job["id"]] = task


async def _settle(getter: asyncio.Future[Any]) -> Any:
    """The job a pending ``queue.get()`` took, or None once it is cancelled without one (a
    cancelled get leaves its item in the queue)."""
    if not getter.done():
        getter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await getter
    return None


def start(config: dict[str, Any]) -> None:
    """``runpod.serverless.start`` with :class:`PromptJobScaler` as its job loop."""
    rp_scale.JobScaler = PromptJobScaler
    runpod.serverless.start(config)
