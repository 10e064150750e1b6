"""The worker's cold-start timing: phases recorded from elsewhere, the process's age from /proc,
and the first job-take seen through runpod's concurrency modifier."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from handler.cold_start import ColdStart, process_age_s
from handler.settings import load_settings
from handler.worker import runpod_config


def test_phases_timed_elsewhere_count_from_the_launch(caplog: pytest.LogCaptureFixture) -> None:
    ticks = iter([10.0, 14.5, 15.0, 45.0, 46.0])
    cold = ColdStart(clock=lambda: next(ticks), started=8.0)  # launched 2 s before the clock's 10
    caplog.set_level("INFO", logger="handler.cold_start")
    cold.record("interpreter and imports", 2.0)
    with cold.phase("model location"):  # 10.0 -> 14.5
        pass
    with cold.phase("engine build"):  # 15.0 -> 45.0
        pass
    assert cold.since_start() == 38.0  # 46.0 - 8.0
    assert [r.getMessage() for r in caplog.records] == [
        "cold start: interpreter and imports took 2.00 s",
        "cold start: model location took 4.50 s",
        "cold start: engine build took 30.00 s",
    ]
    assert cold.phases == {
        "interpreter and imports": 2.0,
        "model location": 4.5,
        "engine build": 30.0,
    }


def test_process_age_comes_from_proc_to_the_hundredth() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(1.5)
        assert 1.4 <= process_age_s(child.pid) <= 1.7
        assert process_age_s() > process_age_s(child.pid)  # this process is older
    finally:
        child.kill()
        child.wait()
    assert process_age_s(child.pid) == 0.0  # gone: /proc cannot tell


def test_the_first_job_take_is_reported_once() -> None:
    async def handler(job: dict[str, object]):  # type: ignore[no-untyped-def]
        yield job

    takes: list[str] = []
    config = runpod_config(
        load_settings({"MAX_CONCURRENCY": "3"}), handler, lambda: takes.append("first")
    )
    assert [config["concurrency_modifier"](n) for n in (1, 3, 9)] == [3, 3, 3]
    assert takes == ["first"]
