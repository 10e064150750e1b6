"""Worker processes behind the local endpoint: each one is ``python -m handler`` with RunPod's
webhook variables pointing at the local endpoint, so runpod's real production loop runs it.

Each worker runs in a fresh working directory of its own, as in its own container: runpod's SDK
keeps the jobs in progress in ``./.runpod_jobs.pkl``, and workers sharing one directory would
count each other's jobs (and a killed worker's stale ones) against their concurrency.

Lifecycle: a worker is *initializing* until it first calls a webhook (runpod starts polling only
after the engine is up), then *ready*. A ready worker that exits fails its unfinished jobs and is
started again (RunPod replaces dead workers); one that exits before it was ever ready stops the
whole endpoint, since its settings or model are broken. :meth:`WorkerPool.stop` sends SIGTERM
(runpod's graceful stop: no new jobs, in-flight ones finish), then kills what is left of each
worker's process group after the grace period, so no process outlives the endpoint. What an
exited worker's group left in ``/dev/shm`` (a SIGKILL of the group kills Python's resource tracker
too) is removed (:mod:`local_endpoint.shm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from handler.errors import WorkerError, job_error
from handler.lmcache import free_port
from handler.settings import LOCAL_ONLY, TELEMETRY_OFF
from local_endpoint import shm
from local_endpoint.jobstore import JobStore

log = logging.getLogger("local_endpoint")

# The folder holding the ``handler`` package, for workers that run in their own directories.
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])

RESTART_DELAY_S = 1.0
GROUP_SETTLE_S = 3.0  # after a worker exits, how long what it started gets to exit too
KILLED_EXIT_S = 30.0  # how long SIGKILLed processes get to be gone (a large RAM tier to unmap)
SHM_SCAN_S = 2.0  # how often the /dev/shm entries each worker's group holds are noted
# ... once every worker is ready (each scan reads every group member's /proc maps, a few ms of
# the endpoint's loop; what a worker makes while starting is noted at its first webhook call)
SHM_SCAN_READY_S = 20.0


def webhook_env(base_url: str, endpoint_id: str, worker_id: str, key: str) -> dict[str, str]:
    """The variables RunPod gives a worker, pointing at ``base_url`` (``$ID`` and
    ``$RUNPOD_POD_ID`` are filled in by the SDK; it appends ``&...`` query parameters).
    ``key`` is the worker key the webhooks require, given through the environment only."""
    hooks = f"{base_url}/v2/{endpoint_id}"
    query = "?gpu=local"
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{hooks}/job-take/$ID{query}",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{hooks}/job-done/$RUNPOD_POD_ID/$ID{query}",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{hooks}/job-stream/$RUNPOD_POD_ID/$ID{query}",
        "RUNPOD_WEBHOOK_PING": f"{hooks}/ping/$RUNPOD_POD_ID{query}",
        "RUNPOD_PING_INTERVAL": "5000",
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_ENDPOINT_ID": endpoint_id,
        # runpod sends it as the Authorization header of every webhook call (and pings only
        # when it is set)
        "RUNPOD_AI_API_KEY": key,
    }


@dataclass
class Worker:
    slot: str  # local-worker-N
    metrics_port: int
    polls: int = 0  # job-take long-polls it holds open now
    id: str = ""  # this start's RUNPOD_POD_ID: the slot, then slot-rK after the K-th start
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    last_seen: float = 0.0
    starts: int = 0
    # how the last start that ended did: its number, exit status, processes of its group left
    last_exit: dict[str, int] | None = None
    started_at: float = 0.0  # wall clock, to compare with /dev/shm entries' times
    shm: set[str] = field(default_factory=set)  # /dev/shm entries its group was seen holding

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class WorkerPool:
    def __init__(
        self,
        count: int,
        base_env: Mapping[str, str],
        base_url: str,
        endpoint_id: str,
        store: JobStore,
        command: Sequence[str] = (sys.executable, "-m", "handler"),
        restart: bool = True,
        clock: Callable[[], float] = time.monotonic,
        worker_key: str | None = None,
    ) -> None:
        self.workers = [
            Worker(slot=f"local-worker-{i}", metrics_port=free_port()) for i in range(count)
        ]
        self._current: dict[str, Worker] = {}
        # what workers authenticate webhook calls with: new for every endpoint run
        self.worker_key = worker_key or secrets.token_urlsafe(32)
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._base_env = dict(base_env)
        self._base_url = base_url
        self._endpoint_id = endpoint_id
        self._store = store
        self._command = tuple(command)
        self._restart = restart
        self._clock = clock
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()
        self._home = Path(tempfile.mkdtemp(prefix="runpod-local-workers-"))
        self._all_ready = asyncio.Event()
        self._scanner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)
        self._scanner = asyncio.create_task(self._scan_shm())

    def current(self, worker_id: str) -> bool:
        """``worker_id`` is the running start of one of this pool's workers."""
        worker = self._current.get(worker_id)
        return worker is not None and worker.alive

    @contextlib.contextmanager
    def polling(self, worker_id: str) -> Iterator[None]:
        """Counts a job-take long-poll of ``worker_id`` while it is held open."""
        worker = self._current.get(worker_id)
        if worker is not None:
            worker.polls += 1
        try:
            yield
        finally:
            if worker is not None:
                worker.polls -= 1

    def seen(self, worker_id: str) -> bool:
        """A webhook call from ``worker_id``; False for a worker this pool is not running."""
        worker = self._current.get(worker_id)
        if worker is None or not worker.alive:
            return False
        first = not worker.ready
        worker.ready, worker.last_seen = True, self._clock()
        if first:
            log.info("worker %s is ready", worker_id)
            self.note_shm()  # what it made while starting
        if self.all_ready:
            self._all_ready.set()
        return True

    async def wait_ready(self) -> None:
        """Return once every worker has called in since it (last) started."""
        await self._all_ready.wait()

    @property
    def all_ready(self) -> bool:
        return all(worker.ready and worker.alive for worker in self.workers)

    def states(self) -> dict[str, int]:
        """RunPod's /health worker counts."""
        ready = [w for w in self.workers if w.ready and w.alive]
        running = sum(1 for w in ready if self._store.running_on(w.id))
        return {
            "idle": len(ready) - running,
            "initializing": sum(1 for w in self.workers if w.alive and not w.ready),
            "ready": len(ready),
            "running": running,
            "throttled": 0,
            "unhealthy": sum(1 for w in self.workers if not w.alive),
        }

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "slot": w.slot,
                "id": w.id,
                "pid": w.process.pid if w.process else None,
                "alive": w.alive,
                "ready": w.ready,
                "starts": w.starts,
                "last_exit": w.last_exit,
                "jobs_in_progress": self._store.running_on(w.id),
                "job_take_polls": w.polls,
                "metrics_url": f"http://127.0.0.1:{w.metrics_port}/metrics",
            }
            for w in self.workers
        ]

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker, release their long-polls, wait, then kill what is left."""
        self._stopping = True
        if self._scanner is not None:
            self._scanner.cancel()
        for worker in self.workers:
            if worker.alive and worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        self._store.close()
        processes = [w.process for w in self.workers if w.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), timeout=grace_s)
        except TimeoutError:
            log.warning("workers did not stop within %.0f s; killing them", grace_s)
        for process in processes:
            if process.returncode is None:  # past the grace period: it and what it started
                _kill_group(process.pid)
                await process.wait()
        # each worker's watcher reaps what the worker left, after the seconds the resource
        # tracker needs to clean up /dev/shm
        watchers = list(self._watchers)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*watchers, return_exceptions=True), GROUP_SETTLE_S + 2
            )
        for task in watchers:
            task.cancel()
        shutil.rmtree(self._home, ignore_errors=True)

    async def _spawn(self, worker: Worker) -> None:
        worker.ready = False
        self._all_ready.clear()
        worker.starts += 1
        worker.started_at, worker.shm = time.time(), set()
        self._current.pop(worker.id, None)
        worker.id = worker.slot if worker.starts == 1 else f"{worker.slot}-r{worker.starts}"
        self._current[worker.id] = worker
        path = self._base_env.get("PYTHONPATH")
        env = {
            **TELEMETRY_OFF,
            **self._base_env,
            **LOCAL_ONLY,
            **webhook_env(self._base_url, self._endpoint_id, worker.id, self.worker_key),
            "WORKER_METRICS_PORT": str(worker.metrics_port),
            "PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{path}" if path else PROJECT_ROOT,
            "PYTHONUNBUFFERED": "1",
        }
        workdir = self._home / worker.slot
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh container: no state from before
        workdir.mkdir(parents=True)
        worker.process = await asyncio.create_subprocess_exec(
            *self._command, env=env, cwd=workdir, start_new_session=True
        )
        log.info("started worker %s (pid %d)", worker.id, worker.process.pid)
        task = asyncio.create_task(self._watch(worker, worker.process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        was_ready, worker.ready = worker.ready, False
        if not self._stopping:
            lost = self._store.fail_worker_jobs(worker.id, worker_lost_error(code))
            log.error("worker %s exited with status %d; %d job(s) failed", worker.id, code, lost)
        # what the rest of the group still holds, before it is killed
        worker.shm |= shm.held_by(p.pid for p in _group(process.pid))
        left = await _reap_group(process.pid)  # anything the worker left behind
        worker.last_exit = {"start": worker.starts, "code": code, "left_behind": left}
        if left:
            log.warning("worker %s left %d process(es) running; killed them", worker.id, left)
        removed = shm.remove_left(worker.shm, worker.started_at)
        if removed:
            log.warning(
                "worker %s left %d entries in /dev/shm; removed them", worker.id, len(removed)
            )
        if self._stopping:
            return
        if not was_ready:
            if not self.fatal.done():
                self.fatal.set_result(f"worker {worker.id} exited with status {code} at start")
            return
        if self._restart:
            await asyncio.sleep(RESTART_DELAY_S)
            if not self._stopping:
                await self._spawn(worker)

    async def _scan_shm(self) -> None:
        """Note, every :data:`SHM_SCAN_S` (:data:`SHM_SCAN_READY_S` while every worker is
        ready), what each running worker's group holds in /dev/shm."""
        last = -SHM_SCAN_READY_S
        while not self._stopping:
            if not self.all_ready or self._clock() - last >= SHM_SCAN_READY_S:
                self.note_shm()
                last = self._clock()
            await asyncio.sleep(SHM_SCAN_S)

    def note_shm(self) -> None:
        groups = {w.process.pid: w for w in self.workers if w.alive and w.process is not None}
        members: dict[int, list[int]] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                pgid = os.getpgid(proc.pid)
                if pgid in groups:
                    members.setdefault(pgid, []).append(proc.pid)
        for pgid, pids in members.items():
            groups[pgid].shm |= shm.held_by(pids)


def worker_lost_error(code: int) -> str:
    return job_error(
        WorkerError(
            f"The worker running this job exited (status {code}); retry the request.",
            status=503,
            type="ServiceUnavailableError",
        )
    )["error"]


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


async def _reap_group(pgid: int, settle_s: float = GROUP_SETTLE_S) -> int:
    """SIGKILL what is left of an exited worker's process group after ``settle_s`` (Python's
    resource tracker exits by itself once the worker has, after cleaning up /dev/shm), and
    return once it is gone, so that what it mapped in /dev/shm is no longer held; how many
    processes were still running at the kill."""
    await _gone(pgid, settle_s)
    left = len(_group(pgid))
    if left:
        _kill_group(pgid)
        # a killed process lets go of its mappings as it exits, not when kill() returns
        if not await _gone(pgid, KILLED_EXIT_S):
            log.warning("process group %d still running %.0f s after SIGKILL", pgid, KILLED_EXIT_S)
    return left


async def _gone(pgid: int, within_s: float) -> bool:
    """Whether process group ``pgid`` has no running process, looking until ``within_s``."""
    for _ in range(round(within_s / 0.1)):
        if not _group(pgid):
            return True
        await asyncio.sleep(0.1)
    return not _group(pgid)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
