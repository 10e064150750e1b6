"""What a worker writes to its disk while it runs jobs: runpod's in-flight job list
(``.runpod_jobs.pkl``, which its heartbeat process reads) holds job ids, never a prompt.

A fake-engine worker under runpod's real production loop, behind the local endpoint; each worker
runs in a fresh directory of its own, as in its own container."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from local_endpoint.harness import LocalEndpoint
from tests.fake_endpoint import fake_endpoint

PAUSE_S = 0.5  # per streamed event: a job runs about 5 s


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    with fake_endpoint(tmp_path_factory.mktemp("disk-endpoint"), PAUSE_S) as started:
        yield started


def files_holding(folder: Path, needle: bytes) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and needle in path.read_bytes():
                found.append(str(path.relative_to(folder)))
        except OSError:  # a temporary file replaced while we looked
            continue
    return found


def test_no_prompt_reaches_the_workers_disk(endpoint: LocalEndpoint) -> None:
    marker = f"prompt-marker-{uuid.uuid4().hex}"
    prompt = (marker + " ") * 2000  # about 100 KB
    ids = []
    for _ in range(3):
        status, body = endpoint.call(
            "POST",
            "/run",
            {
                "input": {
                    "messages": [{"role": "user", "content": prompt}],
                    "model": "fake-model",
                    "stream": True,
                }
            },
        )
        assert status == 200, body
        ids.append(body["id"])
    workdir = Path(psutil.Process(endpoint.workers()[0]["pid"]).cwd())
    state = workdir / ".runpod_jobs.pkl"

    def all_running() -> bool:
        states = {endpoint.call("GET", f"/status/{i}")[1]["status"] for i in ids}
        return states == {"IN_PROGRESS"}

    endpoint.wait_for(all_running, "the jobs to run")
    # runpod writes its list when a job is taken: every id is in it while the jobs run
    endpoint.wait_for(
        lambda: state.exists() and all(i.encode() in state.read_bytes() for i in ids),
        "runpod's in-flight job list",
    )
    seen: list[str] = []
    statuses: list[str] = []

    def all_completed() -> bool:
        seen.extend(files_holding(workdir, marker.encode()))
        statuses[:] = [endpoint.status(i)["status"] for i in ids]
        return set(statuses) == {"COMPLETED"}

    endpoint.wait_for(all_completed, "the jobs to complete", timeout=120, seen=lambda: statuses)
    assert seen == []
