"""Cold start and lifecycle of the worker process (``python -m handler``).

Order: environment switches, settings, logging, where the model comes from
(:mod:`handler.model_source`), where vLLM's compile cache goes (:mod:`handler.compile_cache`:
``VLLM_CACHE_ROOT`` on the network volume, set before vllm is imported), the LMCache server, the
vLLM engine (once), then
``runpod.serverless.start`` (its job loop made prompt by :mod:`handler.job_loop`, and run on the
engine's event loop) with the
async-generator handler, ``return_aggregate_stream`` and a
``concurrency_modifier`` from settings. runpod's own flags (``--rp_serve_api``,
``--rp_log_level``, ...) keep working.

Exit: the engine and its processes are stopped however runpod returns (a drained SIGTERM, SIGINT,
an error). If the engine dies, :class:`EngineWatch` asks runpod to stop taking jobs (the SIGTERM
path runpod installs: in-flight jobs finish with a 503 error), and the process exits with status 1
so RunPod replaces the worker; if that takes longer than ``ENGINE_DEAD_GRACE_S`` it exits anyway.
A malformed setting exits with status 2 and a message that names the variable.

Each cold-start phase is logged with its duration (``cold start: engine build took 31.20 s``),
timed from the process's launch, then a summary line once the engine is ready, and the time of
the first job-take (the first call of runpod's concurrency modifier).
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

from handler import compile_cache, model_source
from handler.lmcache import LMCacheServer
from handler.protocol import Engine
from handler.settings import (
    HUB_OFFLINE,
    Settings,
    SettingsError,
    apply_process_environment,
    environment,
    load_settings,
)

log = logging.getLogger("handler.worker")

CACHE_START_TIMEOUT_S = 120.0
# runpod logs every yielded item, twice, at DEBUG (its default level).
RUNPOD_LOG_DEFAULTS = {"RUNPOD_DEBUG_LEVEL": "INFO"}


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


class ColdStart:
    """Times the cold-start phases, logs each, and sums them up once the worker is ready.
    ``started``: when the cold start began on ``clock`` (default: now), e.g. the process launch."""

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, started: float | None = None
    ) -> None:
        self._clock = clock
        self.started = clock() if started is None else started
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self._clock()
        yield
        self.record(name, self._clock() - started)

    def record(self, name: str, seconds: float) -> None:
        """A phase timed elsewhere (before logging was set up, or inside the engine)."""
        self.phases[name] = seconds
        log.info("cold start: %s took %.2f s", name, seconds)

    def since_start(self) -> float:
        return self._clock() - self.started

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"cold start: ready in {self._clock() - self.started:.1f} s ({parts})"


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


def process_age_s(pid: int | str = "self") -> float:
    """Seconds since the process started (for this one: the interpreter's start and the imports
    so far), from /proc in clock ticks: psutil's create_time rests on a boot time in whole
    seconds. 0 where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def use_compile_cache(settings: Settings) -> None:
    """vLLM's compile cache on the network volume when it can be (:mod:`handler.compile_cache`);
    set in the process environment before vllm is imported."""
    folder = compile_cache.choose(settings.compile_cache_dir, settings.vllm_cache_root)
    log.log(logging.WARNING if folder.problem else logging.INFO, "compile cache: %s", folder.reason)
    apply_process_environment(folder.environment)


def locate_model(settings: Settings) -> Settings:
    """The settings that load the model from where it is (baked, cached, or to download)."""
    source = model_source.find(settings)
    if source.kind == "download":
        log.info("model %s: not baked in, not in RunPod's cache: downloading", settings.model)
    else:
        log.info("model %s: %s at %s", settings.model, source.kind, source.model)
    if source.offline:
        apply_process_environment(HUB_OFFLINE)
    return model_source.apply(settings, source)


def sigterm_self() -> None:
    """runpod's JobScaler turns SIGTERM into a graceful stop: no new jobs, in-flight ones drain."""
    os.kill(os.getpid(), signal.SIGTERM)


# vLLM's serving modules that log a refused request's whole error at ERROR ("Error with model
# ErrorInfo(message=...)"); the message may quote the request (the model name it asked for).
VLLM_ERROR_LOGGERS = (
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.chat_completion.batch_serving",
    "vllm.entrypoints.openai.responses.serving",
    "vllm.entrypoints.scale_out.token_in_token_out.serving",
    "vllm.entrypoints.scale_out.render.serving",
)


class ErrorSummary(logging.Filter):
    """Keeps an error object's type, param and code in a log record, drops its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_summary(arg) for arg in record.args)
        return True


def _summary(arg: Any) -> Any:
    info = getattr(arg, "error", arg)
    if not all(hasattr(info, name) for name in ("message", "type", "param", "code")):
        return arg
    return f"{info.type} (param {info.param}, status {info.code})"


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("handler").setLevel(settings.log_level)
    for name in VLLM_ERROR_LOGGERS:  # vLLM's own logging set-up keeps a logger's filters
        logging.getLogger(name).addFilter(ErrorSummary())


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


def load_or_exit() -> Settings:
    try:
        return load_settings(environment())
    except SettingsError as exc:
        print(f"worker not started: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_timed() -> tuple[Settings, ColdStart]:
    """Settings and logging, and the cold start's clock, started at the process's launch."""
    entered = time.perf_counter()
    launched = entered - process_age_s()
    apply_process_environment(RUNPOD_LOG_DEFAULTS)
    settings = load_or_exit()
    configure_logging(settings)
    cold = ColdStart(started=launched)
    cold.record("interpreter and imports", entered - launched)
    cold.record("settings", time.perf_counter() - entered)
    return settings, cold


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


def timed_engine_start(
    cold: ColdStart,
    settings: Settings,
    cache: LMCacheServer | None,
    on_dead: Callable[[], None],
    after_args: Callable[[], None] = lambda: None,
) -> tuple[Engine, LMCacheServer | None]:
    """:func:`start_engine`, with the engine's own steps (vLLM import and arguments, engine
    build, app build) and the rest (the LMCache server's readiness) as cold-start phases."""
    started = time.perf_counter()
    engine, cache = start_engine(settings, cache, on_dead, after_args)
    total = time.perf_counter() - started
    steps: dict[str, float] = getattr(engine, "start_phases", {})
    for name, seconds in steps.items():
        cold.record(name, seconds)
    cold.record("LMCache readiness and engine watch", total - sum(steps.values()))
    return engine, cache


def start_cache(settings: Settings) -> LMCacheServer | None:
    """The LMCache server starts first and warms up while vLLM loads the model."""
    if not settings.lmcache_enabled:
        return None
    cache = LMCacheServer(settings)
    cache.start()
    return cache


def start_engine(
    settings: Settings,
    cache: LMCacheServer | None,
    on_dead: Callable[[], None] = lambda: None,
    after_args: Callable[[], None] = lambda: None,
) -> tuple[Engine, LMCacheServer | None]:
    """The engine, and the cache server if the engine uses it (a pooling model keeps no KV cache,
    so its LMCache server is stopped). ``after_args``: see ``VllmEngine.start``."""
    from handler.engine import VllmEngine

    connector = cache.connector_config() if cache else None
    try:
        engine = VllmEngine.start(
            settings, on_dead=on_dead, connector=connector, after_args=after_args
        )
    except SettingsError as exc:
        print(f"worker not started: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if cache is not None and not engine.model_info.generates:
        cache.stop()
        return engine, None
    if cache is not None:
        started = time.perf_counter()
        if cache.wait_healthy(CACHE_START_TIMEOUT_S):
            log.info("LMCache server ready (waited %.1f s more)", time.perf_counter() - started)
        else:
            log.warning(
                "LMCache server not healthy after %.0f s: requests are recomputed until it is",
                CACHE_START_TIMEOUT_S,
            )
    return engine, cache


def stop_all(engine: Engine | None, cache: LMCacheServer | None) -> None:
    """The engine first (it talks to the cache), then the cache server."""
    if engine is not None:
        engine.shutdown()
    if cache is not None:
        cache.stop()
