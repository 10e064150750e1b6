"""Issue 14, local endpoint: what hostile input, killed processes and leaving clients found,
driven from outside: HTTP against ``python -m local_endpoint`` with fake-engine workers (runpod's
real production loop in real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from local_endpoint.bodies import MAX_JSON_DEPTH
from local_endpoint.harness import KEY, LocalEndpoint
from local_endpoint.jobstore import JobStore, Status
from local_endpoint.worker_routes import encode_taken
from tests.fake_endpoint import fake_endpoint
from tests.fake_worker import DIES_IN
from tests.fakes import TEXT

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SLOW_S = 5.0  # a one-shot request's time in the fake engine
# a streamed job: 10 events of at least the endpoint's pause each (1 s in the timeout test)
STREAMED = {"messages": QUESTION, "stream": True}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    """One slow worker that holds shared memory, as vLLM's processes do."""
    with fake_endpoint(tmp_path_factory.mktemp("slow"), SLOW_S, FAKE_WORKER_SHM="1") as started:
        yield started


def raw_post(endpoint: LocalEndpoint, path: str, body: bytes) -> tuple[int, Any]:
    """POST exact bytes (json.dumps could not write most of what these tests send)."""
    with socket.create_connection(("127.0.0.1", port(endpoint)), timeout=30) as sock:
        head = (
            f"POST /v2/local{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        return parse_response(read_all(sock))


def port(endpoint: LocalEndpoint) -> int:
    return int(endpoint.url.rsplit(":", 1)[1])


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse_response(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, json.loads(body) if body.strip() else None


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def openai_error(status: int, body: Any, code: int, type_: str = "BadRequestError") -> str:
    assert status == code, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["type"]) == (code, type_)
    return str(body["error"]["message"])


# -- 6: worker webhooks need the worker key ------------------------------------------------------


def test_webhooks_refuse_calls_without_the_worker_key(endpoint: LocalEndpoint) -> None:
    worker = endpoint.workers()[0]
    wid = worker["id"]
    hooks = [
        ("GET", f"/job-take/{wid}"),
        ("GET", f"/job-take-batch/{wid}?batch_size=4"),
        ("POST", f"/job-stream/{wid}/local-x"),
        ("POST", f"/job-done/{wid}/local-x"),
        ("GET", f"/job-stop/{wid}"),
        ("GET", f"/ping/{wid}"),
    ]
    _, job = endpoint.call("POST", "/run", {"input": {"prompt": "secret prompt"}})
    for method, path in hooks:
        for key in ("", KEY):  # nothing, or the clients' key
            body = {"output": "forged"} if method == "POST" else None
            status, answer = endpoint.call(method, path, body, key=key, timeout=10)
            openai_error(status, answer, 401, "AuthenticationError")
    assert endpoint.wait_status(job["id"])["status"] == "COMPLETED"  # the real worker got it

    # the worker has its key from the environment, never from its command line
    process = psutil.Process(worker["pid"])
    worker_key = process.environ()["RUNPOD_AI_API_KEY"]
    assert len(worker_key) >= 32 and worker_key != KEY
    for proc in [process, *process.children(recursive=True), psutil.Process(endpoint.process.pid)]:
        assert not any(worker_key in arg for arg in proc.cmdline())
    assert endpoint.call("GET", f"/ping/{wid}", key=worker_key) == (200, {"ok": True})

    for path in ("//metrics", "//local/workers"):
        status, answer = endpoint.call("GET", path, key="")
        openai_error(status, answer, 401, "AuthenticationError")
    assert "runpod_local_jobs_finished_total" in endpoint.text("/metrics")


# -- 7: nothing the endpoint cannot carry is accepted ---------------------------------------------

UNCARRYABLE = {
    "NaN": b'{"input": {"prompt": "Hi", "temperature": NaN}}',
    "Infinity": b'{"input": {"prompt": "Hi", "max_tokens": Infinity}}',
    "-Infinity": b'{"input": {"x": [-Infinity]}}',
    "escaped surrogate": b'{"input": {"prompt": "\\ud800"}}',
    "surrogate bytes": b'{"input": {"prompt": "\xed\xa0\x80"}}',
    "surrogate key": b'{"input": {"\\udfff": 1}}',
    "too deep": b'{"input": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}",
}


@pytest.mark.parametrize("name", list(UNCARRYABLE))
def test_bodies_that_cannot_reach_a_worker_are_refused_at_submit(
    endpoint: LocalEndpoint, name: str
) -> None:
    body = UNCARRYABLE[name]
    for path in ("/run", "/runsync"):
        openai_error(*raw_post(endpoint, path, body), 400)
    chat = body.replace(b'{"input": ', b'{"model": "fake-model", "messages": [], "x": ', 1)
    openai_error(*raw_post(endpoint, "/openai/v1/chat/completions", chat), 400)
    health = endpoint.call("GET", "/health")[1]["jobs"]
    assert (health["inQueue"], health["inProgress"]) == (0, 0)


def test_the_deepest_body_allowed_still_runs(endpoint: LocalEndpoint) -> None:
    depth = MAX_JSON_DEPTH - 2  # {"input": {"x": [[...]]}}
    body = b'{"input": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    status, job = raw_post(endpoint, "/run", body)
    assert status == 200, job
    assert endpoint.wait_status(job["id"])["status"] == "FAILED"  # no prompt: the worker's 400


async def test_a_job_that_cannot_be_encoded_fails_and_its_batch_still_goes_out() -> None:
    store = JobStore()
    bad, good = store.submit({"x": float("nan")}), store.submit({"prompt": "Hi"})
    taken = await store.take("w0", 4, hold_s=1)
    assert encode_taken(store, taken) == [
        json.dumps({"id": good.id, "input": good.input}, separators=(",", ":")).encode()
    ]
    assert (bad.status, good.status) == (Status.FAILED, Status.IN_PROGRESS)
    assert json.loads(bad.error or "")["error"]["code"] == 400


# -- 8: a one-shot OpenAI request whose client leaves is cancelled --------------------------------


def test_a_one_shot_request_whose_client_times_out_stops_in_the_worker(
    endpoint: LocalEndpoint,
) -> None:
    """The worker logs that it stopped the job (it did not finish by itself) and the engine
    holds no request."""
    aborted = "cancelled; its engine request was aborted"
    cancelled = endpoint.call("GET", "/health")[1]["jobs"]["cancelled"]
    before = endpoint.log.read_text(errors="replace").count(aborted)
    impatient = endpoint.openai().with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="fake-model", messages=QUESTION)  # type: ignore[arg-type]
    endpoint.wait_for(
        lambda: endpoint.log.read_text(errors="replace").count(aborted) == before + 1,
        "the worker to stop the job",
    )
    assert endpoint.worker_metric("worker_engine_running_requests") == 0
    assert endpoint.call("GET", "/health")[1]["jobs"]["cancelled"] == cancelled + 1


# -- 9: hostile bodies ---------------------------------------------------------------------------


def rss(endpoint: LocalEndpoint) -> int:
    return int(psutil.Process(endpoint.process.pid).memory_info().rss)


def send_until_answered(sock: socket.socket, chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Send ``chunks`` until the server answers or hangs up; bytes sent and what came back."""
    sent = 0
    sock.setblocking(False)
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                return sent, drain(sock)
            assert writable, "the endpoint neither read nor answered for 10 s"
            try:
                n = sock.send(view)
            except (BrokenPipeError, ConnectionResetError):
                return sent, drain(sock)
            sent, view = sent + n, view[n:]
    return sent, drain(sock)


def drain(sock: socket.socket) -> bytes:
    sock.setblocking(True)
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


MB = 1 << 20


def test_an_oversized_body_is_refused_before_it_is_read(endpoint: LocalEndpoint) -> None:
    declared = 300 * MB
    before = rss(endpoint)
    with socket.create_connection(("127.0.0.1", port(endpoint))) as sock:
        sock.sendall(
            f"POST /v2/local/run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {declared}\r\n\r\n".encode()
        )
        sent, answer = send_until_answered(sock, (b"x" * MB for _ in range(300)))
    openai_error(*parse_response(answer), 413, "RequestTooLargeError")
    assert sent < 32 * MB  # what socket buffers took; the endpoint read none of it
    assert rss(endpoint) - before < 32 * MB

    # chunked: no length to check, so reading stops at the limit (10 MB for /run)
    with socket.create_connection(("127.0.0.1", port(endpoint))) as sock:
        sock.sendall(
            f"POST /v2/local/run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = f"{MB:x}\r\n".encode() + b"x" * MB + b"\r\n"
        sent, answer = send_until_answered(sock, (chunk for _ in range(100)))
    openai_error(*parse_response(answer), 413, "RequestTooLargeError")
    assert 10 * MB < sent < 48 * MB
    assert rss(endpoint) - before < 64 * MB


def test_json_nested_100000_deep_is_a_400(endpoint: LocalEndpoint) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, body in (
        ("/run", b'{"input": ' + deep + b"}"),
        ("/openai/v1/chat/completions", deep),
    ):
        message = openai_error(*raw_post(endpoint, path, body), 400)
        assert message == f"Request body nests deeper than {MAX_JSON_DEPTH} levels."


# -- 11: a killed worker's shared memory is removed ----------------------------------------------


def test_a_killed_worker_groups_shared_memory_is_removed(endpoint: LocalEndpoint) -> None:
    names = re.findall(r"fake worker shared memory: (\S+) (\S+)", endpoint.log.read_text())[-1]
    shm = Path("/dev/shm")
    assert all((shm / name).exists() for name in names)
    bystander = shared_memory.SharedMemory(create=True, size=4096)  # someone else's
    try:
        victim = endpoint.workers()[0]
        os.killpg(victim["pid"], signal.SIGKILL)  # the worker, its ping and resource tracker
        endpoint.wait_for(
            lambda: (
                endpoint.workers()[0]["starts"] == victim["starts"] + 1
                and endpoint.workers()[0]["ready"]
            ),
            "the worker to be replaced",
            timeout=30,
        )
        assert [name for name in names if (shm / name).exists()] == []
        assert (shm / bystander.name.lstrip("/")).exists()
    finally:
        bystander.close()
        bystander.unlink()


def test_a_killed_workers_children_and_their_shared_memory_go_too(endpoint: LocalEndpoint) -> None:
    """Only the worker's own process is killed (an OOM kill, say): what it started lives on,
    holding its segment, as the engine core and the LMCache server do. The endpoint kills
    them, and removes the segment once they are gone."""
    victim = endpoint.workers()[0]
    endpoint.wait_for(lambda: _cache_server_of(victim["pid"]), "its cache server's segment")
    found = _cache_server_of(victim["pid"])
    assert found is not None
    server, pool = found
    log = endpoint.log.read_text()
    names = [*re.findall(r"fake worker shared memory: (\S+) (\S+)", log)[-1], pool]
    shm = Path("/dev/shm")
    assert all((shm / name).exists() for name in names)
    os.kill(victim["pid"], signal.SIGKILL)  # the worker only
    endpoint.wait_for(
        lambda: endpoint.workers()[0]["starts"] == victim["starts"] + 1,
        "the worker to be replaced",
        timeout=30,
    )
    assert endpoint.workers()[0]["last_exit"]["left_behind"] >= 1  # its cache server, at least
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert [name for name in names if (shm / name).exists()] == []
    endpoint.wait_for(lambda: endpoint.workers()[0]["ready"], "the replacement", timeout=30)


def _cache_server_of(pid: int) -> tuple[psutil.Process, str] | None:
    """The worker's fake cache server and the name of the segment it maps, once it maps it."""
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            for mapped in child.memory_maps():
                if mapped.path.startswith("/dev/shm/fake_cache_pool_"):
                    return child, mapped.path.removeprefix("/dev/shm/")
    return None


# -- 10: a job failed by its worker's engine dying stays FAILED until a client retries it ---------


def test_a_job_failed_by_engine_death_stays_failed_until_retried(tmp_path: Path) -> None:
    """As on RunPod: no automatic retry. A /runsync client gets the 503; a /run job's /status
    says FAILED after the replacement worker is ready; /retry runs it again there, and it
    completes. (Each doomed job kills the engine of the worker it names, so its retry on the
    replacement completes.)"""
    endpoint: LocalEndpoint  # the one started below, which replaced() watches

    def replaced(start: int) -> None:
        endpoint.wait_for(
            lambda: endpoint.workers()[0]["starts"] == start and endpoint.workers()[0]["ready"],
            f"start {start} of the worker",
        )
        assert endpoint.workers()[0]["last_exit"] == {
            "start": start - 1,
            "code": 1,
            "left_behind": 0,
        }

    def doomed(worker: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": DIES_IN + worker["id"]}]}

    with fake_endpoint(tmp_path, 0.0) as endpoint:
        code, answer = endpoint.call("POST", "/runsync", {"input": doomed(endpoint.workers()[0])})
        assert (code, answer["status"]) == (200, "FAILED"), answer
        error = json.loads(answer["error"])["error"]
        assert (error["code"], error["type"]) == (503, "ServiceUnavailableError")
        replaced(2)

        second = endpoint.workers()[0]
        _, job = endpoint.call("POST", "/run", {"input": doomed(second)})
        failed = endpoint.wait_status(job["id"])
        assert failed["status"] == "FAILED" and json.loads(failed["error"])["error"]["code"] == 503
        replaced(3)
        assert endpoint.status(job["id"]) == failed  # nothing retried it meanwhile
        health = endpoint.call("GET", "/health")[1]["jobs"]
        assert (health["failed"], health["retried"], health["inQueue"]) == (2, 0, 0)

        assert endpoint.call("POST", f"/retry/{job['id']}") == (
            200,
            {"id": job["id"], "status": "IN_QUEUE"},
        )
        final = endpoint.wait_status(job["id"])
        assert final["status"] == "COMPLETED", final
        assert final["output"][0]["choices"][0]["message"]["content"] == TEXT
        assert final["workerId"] == endpoint.workers()[0]["id"] != second["id"]
        health = endpoint.call("GET", "/health")[1]["jobs"]
        assert (health["completed"], health["failed"], health["retried"]) == (1, 2, 1)

        # only FAILED or TIMED_OUT jobs can be retried; unknown ones are not found
        code, body = endpoint.call("POST", f"/retry/{job['id']}")
        assert "is COMPLETED; only FAILED or TIMED_OUT jobs can be retried" in openai_error(
            code, body, 400
        )
        code, body = endpoint.call("POST", "/retry/local-nope")
        openai_error(code, body, 404, "NotFoundError")


def test_a_job_past_its_execution_timeout_is_timed_out_and_stopped(tmp_path: Path) -> None:
    """RunPod's policy.executionTimeout: the job ends TIMED_OUT and its worker stops it (the
    fake engine sees the stream closed early); /retry runs it again."""
    with fake_endpoint(tmp_path, 1.0) as endpoint:
        policy = {"executionTimeout": 5000}
        _, job = endpoint.call("POST", "/run", {"input": STREAMED, "policy": policy})
        final = endpoint.wait_status(job["id"])
        assert final["status"] == "TIMED_OUT", final
        assert json.loads(final["error"])["error"] == {
            "message": "The job ran past its execution timeout (5 s).",
            "type": "TimeoutError",
            "param": None,
            "code": 504,
        }
        endpoint.wait_for(
            lambda: (
                endpoint.workers()[0]["jobs_in_progress"] == 0
                and endpoint.worker_metric("worker_engine_running_requests") == 0
            ),
            "the worker to stop the job",
        )
        assert endpoint.call("POST", f"/retry/{job['id']}")[1]["status"] == "IN_QUEUE"
        again = endpoint.wait_status(job["id"])  # a new run, timed out in turn
        assert (again["status"], again["error"]) == ("TIMED_OUT", final["error"])
        code, body = endpoint.call("POST", "/run", {"input": STREAMED, "policy": {"ttl": 5}})
        assert "policy.ttl" in openai_error(code, body, 400)
