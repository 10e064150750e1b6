from __future__ import annotations

import threading

import pytest

from handler.cold_start import ColdStart
from handler.settings import load_settings
from handler.worker import EngineWatch, runpod_config


def test_runpod_config_from_settings() -> None:
    async def handler(job: dict[str, object]):  # type: ignore[no-untyped-def]
        yield job

    config = runpod_config(load_settings({"MAX_CONCURRENCY": "7"}), handler)
    assert config["handler"] is handler and config["return_aggregate_stream"] is True
    assert [config["concurrency_modifier"](n) for n in (1, 7, 50)] == [7, 7, 7]


def test_engine_watch_stops_jobs_once_then_exits_non_zero() -> None:
    stops: list[str] = []
    exited = threading.Event()
    codes: list[int] = []
    order: list[str] = []

    def hard_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    watch = EngineWatch(0.05, lambda: stops.append("stop"), hard_exit)
    watch.before_exit = lambda: order.append("engine shutdown")
    watch.trigger()
    watch.trigger()
    assert exited.wait(5)
    assert (stops, codes, order, watch.triggered) == (["stop"], [1], ["engine shutdown"], True)


def test_process_defaults_keep_values_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from handler import settings

    monkeypatch.setenv("DO_NOT_TRACK", "0")
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    settings.apply_process_environment({"EXTRA_SWITCH": "on"})
    env = settings.environment()
    assert (env["DO_NOT_TRACK"], env["VLLM_NO_USAGE_STATS"], env["EXTRA_SWITCH"]) == (
        "0",
        "1",
        "on",
    )
    monkeypatch.delenv("EXTRA_SWITCH")


def test_cold_start_phases_are_timed_and_summed(caplog: pytest.LogCaptureFixture) -> None:
    ticks = iter([0.0, 1.0, 1.5, 2.0, 32.0, 33.0])
    cold = ColdStart(clock=lambda: next(ticks))
    caplog.set_level("INFO", logger="handler.cold_start")
    with cold.phase("model location"):
        pass
    with cold.phase("engine"):
        pass
    assert cold.summary() == "cold start: ready in 33.0 s (model location 0.5 s, engine 30.0 s)"
    assert [r.getMessage() for r in caplog.records] == [
        "cold start: model location took 0.50 s",
        "cold start: engine took 30.00 s",
    ]
