"""The worker as a process: runpod's --rp_serve_api around the handler, a clean SIGTERM with no
orphaned vLLM process, and runpod's --test_input. (The engine process dying is in
test_lifecycle.py, through the real worker: the jobs fail with a 503, the worker exits 1 and
leaves nothing; the handler's answer after a death is in tests/unit/test_jobs.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from handler.lmcache import free_port
from local_endpoint.harness import ROOT

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
ANSWER = "The capital of France is Paris."


def post(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return dict(json.loads(response.read()))


def wait_for_server(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    pytest.fail("the worker's API did not come up")


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def left_running(procs: list[psutil.Process], timeout: float = 60) -> list[str]:
    """Names of ``procs`` still running once each has exited or ``timeout`` has passed (the
    shutdown already stopped them; a process may still be on its way out)."""
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p.name() for p in alive(procs)]


def test_rp_serve_api_then_sigterm_leaves_no_process(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**os.environ, **worker_env}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "handler",
                "--rp_serve_api",
                "--rp_api_host",
                "127.0.0.1",
                "--rp_api_port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(f"{base}/docs", proc, log)
        job = {
            "input": {"messages": QUESTION, "sampling_params": {"temperature": 0, "max_tokens": 24}}
        }
        result = post(f"{base}/runsync", job)
        assert result["status"] == "COMPLETED"
        [response] = result["output"]
        assert response["choices"][0]["message"]["content"] == ANSWER
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "vLLM runs its engine in child processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert left_running(children) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_python_m_handler_without_runpod_runs_the_test_job(worker_env: dict[str, str]) -> None:
    env = {**os.environ, **worker_env}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    job = {"input": {"messages": QUESTION, "sampling_params": {"max_tokens": 24, "temperature": 0}}}
    done = subprocess.run(
        [sys.executable, "-m", "handler", "--test_input", json.dumps(job)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    answers = [line for line in done.stdout.splitlines() if line.startswith("answer: ")]
    assert answers == [f"answer: {ANSWER}"]
