"""The job loop's job-take (handler.job_loop.PromptJobScaler.get_jobs): a taken batch is queued
and recorded in runpod's in-flight list with one write, and the next job-take goes out before
anything else; runpod's own loop wrote the list once per job and started the taken jobs first,
so the rest of a burst waited in the endpoint (``bench/burst_timeline.py``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from runpod.serverless.modules.worker_state import Job, JobsProgress

from handler.job_loop import PromptJobScaler


async def test_a_taken_batch_is_queued_and_recorded_before_the_next_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / ".runpod_jobs.pkl"
    monkeypatch.setattr(JobsProgress, "_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(JobsProgress, "_STATE_FILE", str(state))
    writes: list[set[Job]] = []
    save = JobsProgress._save_state

    def counted(progress: JobsProgress) -> None:
        writes.append(set(progress))
        save(progress)

    monkeypatch.setattr(JobsProgress, "_save_state", counted)
    scaler = PromptJobScaler({"handler": None, "concurrency_modifier": lambda _current: 8})
    scaler.job_progress._progress.clear()
    writes.clear()
    takes: list[tuple[int, list[str], int]] = []  # (asked for, queued then, list writes then)

    async def take(_session: Any, count: int) -> list[dict[str, Any]] | None:
        queued = [job["id"] for job in scaler.jobs_queue._queue]
        takes.append((count, queued, len(writes)))
        if len(takes) == 1:
            return [{"id": f"job-{i}", "input": {"prompt": "p" * 1000}} for i in range(3)]
        scaler.kill_worker()
        return None

    scaler.jobs_fetcher = take
    await scaler.get_jobs(session=None)

    assert takes == [(8, [], 0), (5, ["job-0", "job-1", "job-2"], 1)]  # 8 places, 3 taken
    assert writes == [{Job(id="job-0"), Job(id="job-1"), Job(id="job-2")}]
    assert pickle.loads(state.read_bytes()) == writes[0]  # ids only: no prompt on disk
    scaler.job_progress._progress.clear()
