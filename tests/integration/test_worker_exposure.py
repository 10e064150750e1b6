"""What a real worker exposes besides its answers: command lines, network destinations, logs and
metrics. One local endpoint with one real worker (LMCache on, a password-protected redis-server
as its shared store) runs under ``strace -f``, which records every connect/sendto/sendmsg of the
endpoint, the worker, the engine's processes and the LMCache server.

* The store's password is on no process's command line, and the store still works.
* Requests carrying a unique marker in every text field, good and bad ones, leave no trace of it
  in anything the worker printed (the endpoint's log holds it) or in its metrics; the metrics
  name the model by its served name, not its folder.
* No process sends to or connects to an address off loopback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from handler.lmcache import free_port
from local_endpoint.harness import KEY, MODEL_ID, ROOT, LocalEndpoint
from tests.integration.test_lmcache import cache_server, cached, document, full_chunks

pytestmark = pytest.mark.integration

PASSWORD = f"pw-{uuid.uuid4().hex}"
MARKER = f"mk{uuid.uuid4().hex[:12]}"


def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        pytest.skip("strace is not installed and could not be (Debian: apt-get install strace)")
    return found


class PasswordRedis:
    """redis-server on loopback with ``requirepass`` from a config file (not its command line)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
        conf = workdir / "redis.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nsave ''\nappendonly no\ndir {workdir}\n"
            f"requirepass {PASSWORD}\n"
        )
        conf.chmod(0o600)
        self.process = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, socket_timeout=2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path_factory.mktemp("redis-auth"))
    yield server
    server.stop()


class Traced:
    def __init__(self, endpoint: LocalEndpoint, trace: Path) -> None:
        self.endpoint, self.trace = endpoint, trace


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str], store: PasswordRedis
) -> Iterator[Traced]:
    """The endpoint as a child of ``strace -f``; stopped with SIGTERM to the endpoint itself
    (strace exits with its tracee's status)."""
    tmp = tmp_path_factory.mktemp("traced")
    trace, ready, log = tmp / "strace.txt", tmp / "ready.json", tmp / "local-endpoint.log"
    env = {
        **worker_env,
        "LMCACHE_L2_URL": f"redis://:{PASSWORD}@127.0.0.1:{store.port}",
        "ENABLE_PREFIX_CACHING": "false",  # every hit is LMCache's
    }
    command = [strace(), "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,sendmsg"]
    command += ["-e", "signal=none", "-o", str(trace), "--", sys.executable, "-m"]
    command += ["local_endpoint", "--port", "0", "--api-key", KEY, "--ready-file", str(ready)]
    with log.open("wb") as out:
        tracer = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_environ(env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = LocalEndpoint(url="", process=tracer, log=log)
    try:
        deadline = time.monotonic() + 400
        while not ready.exists():
            assert tracer.poll() is None, f"endpoint exited:\n{endpoint.tail()}"
            assert time.monotonic() < deadline, f"endpoint not ready:\n{endpoint.tail()}"
            time.sleep(0.2)
        endpoint.url = json.loads(ready.read_text())["url"]
        yield Traced(endpoint, trace)
    finally:
        _stop(tracer)


def _environ(env: Mapping[str, str]) -> dict[str, str]:
    return {**os.environ, **env}


def _stop(tracer: subprocess.Popen[bytes]) -> None:
    if tracer.poll() is not None:
        return
    children = psutil.Process(tracer.pid).children()
    for child in children:
        child.send_signal(signal.SIGTERM)
    try:
        tracer.wait(120)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(tracer.pid).children(recursive=True):
            child.kill()
        tracer.kill()
        raise


def ask(endpoint: LocalEndpoint, doc: str) -> dict[str, Any]:
    status, body = endpoint.call(
        "POST",
        "/openai/v1/chat/completions",
        {
            "model": MODEL_ID,
            "messages": [{"role": "system", "content": doc}, {"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "temperature": 0,
        },
        timeout=120,
    )
    assert status == 200, body
    return dict(body["usage"])


def command_lines_holding(secret: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = cmdline.read_bytes()
        except OSError:  # the process ended
            continue
        if secret.encode() in raw:
            found.append(raw.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def test_the_store_password_is_on_no_command_line_and_the_store_works(
    traced: Traced, store: PasswordRedis
) -> None:
    endpoint = traced.endpoint
    server = cache_server(endpoint)
    assert "resp" in " ".join(server.cmdline())  # the shared store is configured
    assert command_lines_holding(PASSWORD) == []

    doc = document("Secret")
    hits = full_chunks(ask(endpoint, doc))
    # chunks reach the store only when LMCache authenticated with the password
    endpoint.wait_for(lambda: store.client().dbsize() >= hits // 256, "chunks in redis")

    # a fresh LMCache server (empty RAM tier) finds them there
    server.kill()
    endpoint.wait_for(
        lambda: endpoint.worker_metric("worker_lmcache_restarts") == 1,
        "the LMCache server to be restarted",
        timeout=120,
    )
    other = document("Warmup")  # hits on this one: vLLM is connected to the new server
    endpoint.wait_for(lambda: cached(ask(endpoint, other)) > 0, "the new server", timeout=120)
    assert cached(ask(endpoint, doc)) == hits  # it never saw this prompt: from redis
    assert metric_total(endpoint, "lmcache_mp_lookup_hit_l2_tokens_total") >= hits
    assert command_lines_holding(PASSWORD) == []


def metric_total(endpoint: LocalEndpoint, name: str) -> float:
    """A metric's sum over its series, from the worker's metrics server."""
    with urllib.request.urlopen(endpoint.workers()[0]["metrics_url"], timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + " ", name + "{"))
    )


def marked(field: str) -> str:
    return f"{MARKER}-{field}"


def tools(name: str = "lookup") -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": f"{name}_{MARKER}",
                "description": marked("tool-description"),
                "parameters": {
                    "type": "object",
                    "properties": {
                        f"city_{MARKER}": {"type": "string", "description": marked("param")}
                    },
                    "required": [f"city_{MARKER}"],
                },
            },
        }
    ]


def messages(n: int = 1) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": marked("system")},
        {"role": "user", "content": [{"type": "text", "text": marked("user-part")}]},
        {"role": "assistant", "content": marked("assistant")},
        {"role": "user", "content": marked("user") * n, "name": f"n{MARKER}"},
    ]


SCHEMA = {
    "type": "object",
    "description": marked("schema-description"),
    "properties": {f"answer_{MARKER}": {"type": "string", "enum": [marked("enum")]}},
}

CHAT = {
    "model": MODEL_ID,
    "messages": messages(),
    "max_tokens": 4,
    "stop": [marked("stop")],
    "user": marked("user-id"),
    "metadata": {"note": marked("metadata")},
}

# (route, body): accepted requests first, then requests that are refused
OPENAI_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/chat/completions", CHAT),
    ("/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    ("/chat/completions", {**CHAT, "tools": tools(), "tool_choice": "none"}),
    (
        "/chat/completions",
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": f"s_{MARKER}", "schema": SCHEMA, "strict": True},
            },
        },
    ),
    ("/completions", {"model": MODEL_ID, "prompt": marked("prompt"), "max_tokens": 4}),
    ("/completions", {"model": MODEL_ID, "prompt": [marked("p1"), marked("p2")], "max_tokens": 2}),
    (
        "/responses",
        {
            "model": MODEL_ID,
            "input": marked("input"),
            "instructions": marked("instructions"),
            "max_output_tokens": 4,
        },
    ),
    ("/tokenize", {"model": MODEL_ID, "prompt": marked("tokenize")}),
    ("/chat/completions", {**CHAT, f"unknown_{MARKER}": marked("extra")}),  # vLLM ignores it
    # the chat template renders any role
    ("/chat/completions", {**CHAT, "messages": [{"role": f"role-{MARKER}", "content": "x"}]}),
    # refused: each error message could quote the request
    (
        "/chat/completions",
        {
            **CHAT,
            "tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": f"absent_{MARKER}"}},
        },
    ),
    ("/chat/completions", {**CHAT, "model": f"model-{MARKER}"}),
    ("/chat/completions", {**CHAT, "temperature": marked("temperature")}),
    ("/chat/completions", {**CHAT, "tools": [{"type": "function", "name": marked("bad-tool")}]}),
    (
        "/chat/completions",
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": {"type": marked("bad-type")}},
            },
        },
    ),
    ("/chat/completions", {**CHAT, "messages": messages(3000), "max_tokens": 1}),
    ("/chat/completions", {**CHAT, "n": 2, "temperature": 0}),
    ("/completions", {"model": MODEL_ID, "prompt": marked("p"), "logit_bias": {MARKER: 1}}),
]

NATIVE_REQUESTS: list[dict[str, Any]] = [
    {"messages": messages(), "sampling_params": {"max_tokens": 4, "stop": [marked("stop")]}},
    {"prompt": marked("native-prompt"), "sampling_params": {"max_tokens": 4}, "stream": True},
    {"requests": [{"prompt": marked("batch"), "sampling_params": {"max_tokens": 2}}]},
    # refused
    {"messages": messages(), "sampling_params": {"max_tokens": marked("max")}},
    {"messages": messages(), "tools": tools(), "tool_choice": marked("choice")},
    # (an unknown key's own name is logged as the param: a key, not text)
    {"prompt": marked("p"), "unknown_field": 1},
    {"route": f"/v1/{MARKER}", "body": {"prompt": marked("route")}},
]


def test_no_request_text_in_the_worker_logs_or_metrics(traced: Traced) -> None:
    endpoint = traced.endpoint
    statuses = []
    for route, body in OPENAI_REQUESTS:
        status, _ = _post_raw(endpoint, f"{endpoint.openai_base}{route}", body)
        statuses.append(status)
    assert statuses[:10] == [200] * 10, str(statuses)
    assert all(400 <= s < 500 for s in statuses[10:]), str(statuses)
    finished = []
    for job in NATIVE_REQUESTS:
        status, body = endpoint.call("POST", "/runsync", {"input": job}, timeout=120)
        assert status == 200, body
        finished.append(body["status"])
    assert finished == ["COMPLETED"] * 3 + ["FAILED"] * 4

    time.sleep(1)  # the worker's last lines reach the log
    printed = endpoint.log.read_text(errors="replace")
    lines = [line for line in printed.splitlines() if MARKER in line]
    assert lines == []
    assert "rejected: BadRequestError" in printed  # what a rejection logs instead

    with urllib.request.urlopen(endpoint.workers()[0]["metrics_url"], timeout=10) as response:
        metrics = response.read().decode()
    assert MARKER not in metrics
    folder = os.environ["WORKER_TEST_MODEL"]
    labels = set(re.findall(r'model_name="([^"]*)"', metrics))
    assert labels == {MODEL_ID}, labels
    assert folder not in metrics


def _post_raw(endpoint: LocalEndpoint, url: str, body: Any) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {endpoint.key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


_INET = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6?, "([^"]+)"')


def off_loopback(trace: str) -> list[str]:
    """Lines of the trace whose destination is an inet address outside 127.0.0.0/8 and ::1."""
    bad = []
    for line in trace.splitlines():
        for v4, v6 in _INET.findall(line):
            address = ipaddress.ip_address(v4 or v6)
            mapped = getattr(address, "ipv4_mapped", None)
            if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
                bad.append(line)
    return bad


def test_no_process_reaches_off_loopback(traced: Traced) -> None:
    """Last: by now the trace covers the start, the requests above and a cache server restart."""
    trace = traced.trace.read_text(errors="replace")
    assert "connect(" in trace  # the tracer saw the endpoint's own loopback traffic
    assert off_loopback(trace) == []
