"""Cold start and lifecycle of the worker process (``python -m handler``).

Order: environment switches, settings, logging, where the model comes from
(:mod:`handler.model_source`), the LMCache server, the vLLM engine (once), then
``runpod.serverless.start`` (its job loop made prompt by :mod:`handler.job_loop`) with the
async-generator handler, ``return_aggregate_stream`` and a
``concurrency_modifier`` from settings. runpod's own flags (``--rp_serve_api``,
``--rp_log_level``, ...) keep working.

Exit: the engine and its processes are stopped however runpod returns (a drained SIGTERM, SIGINT,
an error). If the engine dies, :class:`EngineWatch` asks runpod to stop taking jobs (the SIGTERM
path runpod installs: in-flight jobs finish with a 503 error), and the process exits with status 1
so RunPod replaces the worker; if that takes longer than ``ENGINE_DEAD_GRACE_S`` it exits anyway.
A malformed setting exits with status 2 and a message that names the variable.

Each cold-start phase is logged with its duration (``cold start: engine took 31.2 s``), then a
summary line once the worker can take jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvloop

from handler import model_source
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
    """Times the cold-start phases, logs each, and sums them up once the worker is ready."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = clock()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self._clock()
        yield
        self.phases[name] = self._clock() - started
        log.info("cold start: %s took %.1f s", name, self.phases[name])

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"cold start: ready in {self._clock() - self.started:.1f} s ({parts})"


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


def runpod_config(settings: Settings, handler: Callable[..., Any]) -> dict[str, Any]:
    return {
        "handler": handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": lambda _current: settings.max_concurrency,
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


def main() -> None:
    apply_process_environment(RUNPOD_LOG_DEFAULTS)
    settings = load_or_exit()
    configure_logging(settings)
    # uvloop (as `vllm serve`) for every event loop of the worker: the engine's, and runpod's
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # Until runpod installs its own handlers, SIGTERM unwinds through the engine shutdown below.
    signal.signal(signal.SIGTERM, _exit_on_signal)

    from handler import job_loop
    from handler.jobs import make_handler
    from handler.metrics import serve_metrics

    watch = EngineWatch(settings.engine_dead_grace_s, sigterm_self)
    cold = ColdStart()
    with cold.phase("model location"):
        settings = locate_model(settings)
    with cold.phase("LMCache server spawn"):
        cache = start_cache(settings)
    engine: Engine | None = None
    try:
        with cold.phase("engine"):
            engine, cache = start_engine(settings, cache, watch.trigger)
        watch.before_exit = lambda: stop_all(engine, cache)
        serve_metrics(settings, engine, cache)
        log.info(cold.summary())
        if settings.on_runpod or "--rp_serve_api" in sys.argv:
            handler = make_handler(engine, settings, watch.trigger)
            job_loop.start(runpod_config(settings, handler), settings.shutdown_grace_s)
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


def start_cache(settings: Settings) -> LMCacheServer | None:
    """The LMCache server starts first and warms up while vLLM loads the model."""
    if not settings.lmcache_enabled:
        return None
    cache = LMCacheServer(settings)
    cache.start()
    return cache


def start_engine(
    settings: Settings, cache: LMCacheServer | None, on_dead: Callable[[], None] = lambda: None
) -> tuple[Engine, LMCacheServer | None]:
    """The engine, and the cache server if the engine uses it (a pooling model keeps no KV cache,
    so its LMCache server is stopped)."""
    from handler.engine import VllmEngine

    connector = cache.connector_config() if cache else None
    try:
        engine = VllmEngine.start(settings, on_dead=on_dead, connector=connector)
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
