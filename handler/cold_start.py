"""The cold-start steps of the worker, shared by its two entry points: ``python -m handler``
(:mod:`handler.worker`, the image's) and ``python -m handler.run_local`` (one job from
``test_input.json``, ``make run``).

Order: environment switches, settings and logging (:func:`settings_timed`), where the model comes
from (:func:`locate_model`, :mod:`handler.model_source`), where vLLM's compile cache goes
(:func:`use_compile_cache`: ``VLLM_CACHE_ROOT`` on the network volume, set before vllm is
imported), the LMCache server (:func:`start_cache`), the vLLM engine, once (:func:`start_engine`),
then :func:`stop_all` however the process ends. A malformed setting exits with status 2 and a
message that names the variable.

Each phase is timed with :class:`ColdStart` and logged with its duration (``cold start: engine
build took 31.20 s``), from the process's launch, then a summary line once the engine is ready.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from handler import compile_cache, model_source
from handler.engine.interface import Engine
from handler.lmcache import LMCacheServer
from handler.settings import (
    HUB_OFFLINE,
    Settings,
    SettingsError,
    apply_process_environment,
    environment,
    load_settings,
)

log = logging.getLogger("handler.cold_start")

CACHE_START_TIMEOUT_S = 120.0


# runpod logs every yielded item, twice, at DEBUG (its default level).
RUNPOD_LOG_DEFAULTS = {"RUNPOD_DEBUG_LEVEL": "INFO"}


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
    from handler.engine.vllm_engine import VllmEngine

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
