"""The harness that tests and benchmarks drive the local endpoint with: start ``python -m
local_endpoint`` as a process with workers on the default model (:func:`local_env`), talk to it
(HTTP, the OpenAI SDK, runpod's client), wait for what it reports, stop it.

Stopping checks what the issue promises: exit status 0 and no process left of those the endpoint
started (workers, vLLM engine processes, runpod's ping process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import runpod
from openai import AsyncOpenAI, OpenAI

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL_ID = "SmolLM2-135M-Instruct"  # the default model's served name
TOOLS_TEMPLATE = ROOT / "configs" / "smollm2-tools.jinja"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
ABORTED = "cancelled; its engine request was aborted"  # a worker's log line for a stopped job


@dataclass
class LocalEndpoint:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    key: str = KEY

    @property
    def base(self) -> str:
        return f"{self.url}/v2/local"

    @property
    def openai_base(self) -> str:
        return f"{self.base}/openai/v1"

    def call(
        self, method: str, path: str, body: Any = None, key: str | None = None, timeout: float = 60
    ) -> tuple[int, Any]:
        """One request to ``base + path`` (or to ``url + path`` for a path starting with //)."""
        url = self.url + path[1:] if path.startswith("//") else self.base + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.key if key is None else key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, (json.loads(raw) if raw.strip() else None)

    def text(self, path: str, key: str | None = None) -> str:
        """A GET of ``url + path`` (``/metrics``, ...) as text, with the client key."""
        headers = {"Authorization": f"Bearer {self.key if key is None else key}"}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    def workers(self) -> list[dict[str, Any]]:
        status, body = self.call("GET", "//local/workers")
        assert status == 200, body
        return list(body)

    def worker_metric(self, name: str, worker: int = 0, default: float | None = None) -> float:
        """A metric's value (its first series) from a worker's own metrics server."""
        url = self.workers()[worker]["metrics_url"]
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise AssertionError(f"metric {name} not served by worker {worker}")

    def wait_for(
        self,
        predicate: Callable[[], object],
        what: str,
        timeout: float = 60,
        seen: Callable[[], object] | None = None,
    ) -> None:
        """Poll ``predicate`` until it holds. ``timeout`` is a safety net, not a measurement: a
        wait that runs out says what it saw (``seen()``, and the endpoint's jobs and workers)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                last = f"; last seen: {seen()}" if seen is not None else ""
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what}{last}; {self.state()}"
                )
            time.sleep(0.1)

    def state(self) -> str:
        """The endpoint's job counts and its workers, for a wait that timed out."""
        try:
            health = self.call("GET", "/health", timeout=10)[1]
            workers = self.workers()
        except (OSError, AssertionError) as exc:
            return f"the endpoint did not answer: {exc!r}"
        keys = ("id", "alive", "ready", "starts", "last_exit", "jobs_in_progress")
        brief = [{key: worker.get(key) for key in keys} for worker in workers]
        return f"jobs {health.get('jobs')}; workers {brief}"

    def status(self, job_id: str) -> dict[str, Any]:
        """RunPod's /status of ``job_id``."""
        code, body = self.call("GET", f"/status/{job_id}")
        assert code == 200, (code, body)
        return dict(body)

    def wait_status(
        self, job_id: str, statuses: Collection[str] = FINAL, timeout: float = 240
    ) -> dict[str, Any]:
        """The job's /status once it is in one of ``statuses`` (by default: it has ended)."""
        last: dict[str, Any] = {}

        def reached() -> bool:
            last.clear()
            last.update(self.status(job_id))
            return last["status"] in statuses

        self.wait_for(reached, f"job {job_id} to be {'/'.join(statuses)}", timeout, lambda: last)
        return last

    def first_output(self, job_id: str, timeout: float = 240) -> list[Any]:
        """The job's first streamed chunks, once the endpoint has them (RunPod's /stream)."""
        chunks: list[Any] = []
        last: dict[str, Any] = {}

        def arrived() -> bool:
            code, body = self.call("POST", f"/stream/{job_id}")
            assert code == 200, (code, body)
            last.clear()
            last.update(body)
            chunks.extend(item["output"] for item in body["stream"])
            return bool(chunks) or body["status"] in FINAL

        self.wait_for(arrived, f"job {job_id}'s first output", timeout, lambda: last)
        assert chunks, f"job {job_id} ended with no output: {last}"
        return chunks

    def log_count(self, text: str) -> int:
        """How many times ``text`` appears in the endpoint's log (its workers' output too)."""
        return self.log.read_text(errors="replace").count(text)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def openai(self) -> OpenAI:
        """The unmodified OpenAI SDK, pointed at the endpoint's OpenAI route."""
        return OpenAI(base_url=self.openai_base, api_key=self.key, max_retries=0)

    def async_openai(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.openai_base, api_key=self.key, max_retries=0)

    def runpod(self) -> runpod.Endpoint:
        """runpod's own client, with its base URL pointed here (a module-wide setting)."""
        runpod.api_key = self.key
        runpod.endpoint_url_base = f"{self.url}/v2"
        return runpod.Endpoint("local")


def local_env() -> dict[str, str]:
    """The worker settings of ``make serve`` on the default model: configs/local.env
    (scripts/gpu-smoke points WORKER_TEST_ENV at configs/gpu.env), the converted model that
    scripts/in-env points WORKER_TEST_MODEL at, and its chat template with a tool section, from
    which the worker detects the hermes tool parser (scripts/in-env sets the same)."""
    env: dict[str, str] = {}
    path = Path(os.environ.get("WORKER_TEST_ENV") or ROOT / "configs" / "local.env")
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    model = os.environ.get("WORKER_TEST_MODEL")
    if not model:
        raise RuntimeError("WORKER_TEST_MODEL is not set: run this through `make` (scripts/in-env)")
    env["MODEL_NAME"] = model
    env["CHAT_TEMPLATE"] = str(TOOLS_TEMPLATE)
    return env


@contextlib.contextmanager
def local_endpoint(
    tmp: Path,
    env: Mapping[str, str],
    *args: str,
    start_timeout: float = 300,
) -> Iterator[LocalEndpoint]:
    """The endpoint with ``args`` (``--workers``, ``--worker-module``, ...), key :data:`KEY`."""
    ready = tmp / "ready.json"
    log = tmp / "local-endpoint.log"
    command = [sys.executable, "-m", "local_endpoint", "--port", "0", "--api-key", KEY]
    command += ["--ready-file", str(ready), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = LocalEndpoint(url="", process=process, log=log)
    try:
        deadline = time.monotonic() + start_timeout
        while not ready.exists():
            if process.poll() is not None:
                code = process.returncode
                raise AssertionError(f"endpoint exited with {code}:\n{endpoint.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"endpoint not ready in {start_timeout} s:\n{endpoint.tail()}")
            time.sleep(0.2)
        endpoint.url = json.loads(ready.read_text())["url"]
        yield endpoint
    finally:
        stop(endpoint)


def stop(endpoint: LocalEndpoint, timeout: float = 120) -> None:
    """SIGTERM; then the endpoint must exit 0 and leave none of its processes behind."""
    process = endpoint.process
    if process.poll() is not None:
        return
    family = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"endpoint did not stop in {timeout} s:\n{endpoint.tail()}") from None
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for orphan in left:
        orphan.kill()
    assert code == 0, f"endpoint exited with {code}:\n{endpoint.tail()}"
    assert not left, f"processes left after shutdown: {[p.name() for p in left]}"
