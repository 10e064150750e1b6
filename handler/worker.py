"""``python -m handler``: the worker process the image runs.

The cold start (:mod:`handler.cold_start`: settings, logging, model, compile cache, LMCache server,
vLLM engine), then ``runpod.serverless.start`` (its job loop made prompt by
:mod:`handler.job_loop`, and run on the engine's event loop) with the async-generator handler,
``return_aggregate_stream`` and a ``concurrency_modifier`` from settings. runpod's own flags
(``--rp_serve_api``, ``--rp_log_level``, ...) keep working. runpod's job-loop modules are imported
in a thread while the engine builds (:class:`BackgroundImports`); the first job-take's time is
logged (the first call of runpod's concurrency modifier).

Exit: the engine and its processes are stopped however runpod returns (a drained SIGTERM, SIGINT,
an error). If the engine dies, :class:`EngineWatch` asks runpod to stop taking jobs (the SIGTERM
path runpod installs: in-flight jobs finish with a 503 error), and the process exits with status 1
so RunPod replaces the worker; if that takes longer than ``ENGINE_DEAD_GRACE_S`` it exits anyway.
A malformed setting exits with status 2 and a message that names the variable.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvloop

from handler.cold_start import (
    locate_model,
    settings_timed,
    start_cache,
    stop_all,
    timed_engine_start,
    use_compile_cache,
)
from handler.engine.interface import Engine
from handler.settings import Settings

log = logging.getLogger("handler.worker")


class EngineWatch:
    """What happens when the engine dies: stop taking jobs, then exit non-zero."""

    def __init__(
        self,
        grace_s: float,
        stop_taking_jobs: Callable[[], None],
        hard_exit: Callable[[int], None] = os._exit,
    ) -> None:
        self._grace_s = grace_s
        self._stop_taking_jobs = stop_taking_jobs
        self._hard_exit = hard_exit
        self._lock = threading.Lock()
        self.triggered = False
        self.before_exit: Callable[[], None] = lambda: None

    def trigger(self) -> None:
        """Thread-safe and idempotent; called by the engine's health watch or by a failing job."""
        with self._lock:
            if self.triggered:
                return
            self.triggered = True
        log.critical("engine dead: no more jobs are taken; exiting within %.0f s", self._grace_s)
        threading.Thread(target=self._deadline, name="engine-dead-exit", daemon=True).start()
        self._stop_taking_jobs()

    def _deadline(self) -> None:
        time.sleep(self._grace_s)
        log.critical("in-flight jobs did not finish within the grace period; exiting now")
        self.before_exit()
        self._hard_exit(1)


# Needed only once the engine is ready. runpod's import takes 1.2-1.5 s on the 2-core development
# machine, most of it py-cpuinfo probing the CPU in a subprocess (runpod's rp_debugger, at import).
JOB_LOOP_MODULES = ("handler.job_loop", "handler.jobs", "handler.metrics")


class BackgroundImports:
    """Imports modules in a thread while the engine builds (its main thread only waits then).
    Started once vLLM is imported, so the two never import a shared module at the same time; the
    main thread imports them again after :meth:`wait`, which raises any import error there."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="worker-imports", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        for name in self._names:
            try:
                importlib.import_module(name)
            except Exception:  # raised again by the main thread's import
                return
        log.info(
            "runpod and handler imported in %.2f s, beside the engine build",
            time.perf_counter() - started,
        )

    def wait(self) -> None:
        self.start()  # not started if the engine failed before its arguments were parsed
        if self._thread is not None:
            self._thread.join()


def sigterm_self() -> None:
    """runpod's JobScaler turns SIGTERM into a graceful stop: no new jobs, in-flight ones drain."""
    os.kill(os.getpid(), signal.SIGTERM)


def runpod_config(
    settings: Settings,
    handler: Callable[..., Any],
    on_first_take: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """runpod's start() configuration. runpod asks the concurrency modifier right before each
    job-take, so ``on_first_take`` runs once, as the worker first asks for a job."""
    pending = [on_first_take] if on_first_take else []

    def concurrency_modifier(_current: int) -> int:
        while pending:
            pending.pop()()
        return settings.max_concurrency

    return {
        "handler": handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": concurrency_modifier,
    }


def _exit_on_signal(_signum: int, _frame: FrameType | None) -> None:
    """A requested stop: unwind through the engine shutdown and exit 0."""
    raise SystemExit(0)


def main() -> None:
    settings, cold = settings_timed()
    # uvloop (as `vllm serve`) for every event loop of the worker: the engine's, which runpod's
    # job loop shares, and uvicorn's under --rp_serve_api
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # Until runpod installs its own handlers, SIGTERM unwinds through the engine shutdown below.
    signal.signal(signal.SIGTERM, _exit_on_signal)

    imports = BackgroundImports(JOB_LOOP_MODULES)
    watch = EngineWatch(settings.engine_dead_grace_s, sigterm_self)
    with cold.phase("model location"):
        settings = locate_model(settings)
    with cold.phase("compile cache folder"):
        use_compile_cache(settings)
    with cold.phase("LMCache server spawn"):
        cache = start_cache(settings)
    engine: Engine | None = None
    try:
        engine, cache = timed_engine_start(cold, settings, cache, watch.trigger, imports.start)
        with cold.phase("runpod and handler imports, left after the engine"):
            imports.wait()
            from handler import job_loop
            from handler.jobs import make_handler
            from handler.metrics import serve_metrics
        engine_ready = time.perf_counter()
        watch.before_exit = lambda: stop_all(engine, cache)
        serve_metrics(settings, engine, cache)
        log.info(cold.summary())
        if settings.on_runpod or "--rp_serve_api" in sys.argv:
            handler = make_handler(engine, settings, watch.trigger)

            def first_take() -> None:
                cold.record("metrics and job loop start", time.perf_counter() - engine_ready)
                log.info("cold start: first job-take %.2f s after launch", cold.since_start())

            config = runpod_config(settings, handler, first_take)
            job_loop.start(config, settings.shutdown_grace_s, engine.loop)
        else:  # runpod's local mode would only print the generator object: run the job here
            from handler.run_local import read_job, run_and_report

            code = run_and_report(engine, settings, read_job(sys.argv[1:]))
            raise SystemExit(code)
    finally:
        # read before the shutdown, after which the engine reports itself dead too
        died = watch.triggered or (engine is not None and engine.dead)
        stop_all(engine, cache)
    if died:
        raise SystemExit(1)
