"""Fuzz of the local endpoint (issue 14): raw bodies with what JSON text can hold but a worker
cannot be sent (``NaN``, ``Infinity``, lone UTF-16 surrogates, deep nesting), mixed into random
JSON, posted as bytes to ``/run`` and the OpenAI route of ``python -m local_endpoint`` with a
fake-engine worker. Every request ends within :data:`DEADLINE_S`: refused at submission with a
4xx OpenAI error, or a job that reaches COMPLETED or FAILED (an OpenAI route answer, error or
not); nothing is left queued or running."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from local_endpoint.bodies import MAX_JSON_DEPTH
from local_endpoint.harness import KEY, LocalEndpoint
from tests.fake_endpoint import fake_endpoint
from tests.fuzz_inputs import fuzz_settings

# a tenth of the handler fuzz's count (each example is a few HTTP round trips), 20 to 100
ENDPOINT_EXAMPLES = max(20, min(100, int(os.environ.get("FUZZ_EXAMPLES", "5000")) // 10))
DEADLINE_S = 10.0

hazards = st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), "\ud800", "a\udfffb", "\ud83d", "\U0001f600"]
)
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), hazards
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.sampled_from(["\ud800", "k\udfff"])),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=8,
)
depths = st.one_of(
    st.just(0),
    st.integers(min_value=1, max_value=MAX_JSON_DEPTH + 8),
    st.sampled_from([1000, 5000, 100_000]),
)


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    """JSON text as a careless client writes it: NaN and Infinity as bare words, lone
    surrogates as ``\\uXXXX`` escapes, wrapped in ``depth`` arrays."""
    text = json.dumps(draw(values), allow_nan=True).encode()
    depth = draw(depths)
    return b"[" * depth + text + b"]" * depth


def openai_bodies(value: bytes) -> st.SearchStrategy[bytes]:
    message = b'{"role": "user", "content": ' + value + b"}"
    return st.sampled_from(
        [
            value,
            b'{"model": "fake-model", "messages": [' + message + b"]}",
            b'{"model": "fake-model", "stream": true, "messages": [' + message + b"]}",
            b'{"model": "fake-model", "messages": [], "temperature": ' + value + b"}",
        ]
    )


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    with fake_endpoint(tmp_path_factory.mktemp("fuzz-endpoint"), 0) as started:
        yield started


def post(endpoint: LocalEndpoint, path: str, body: bytes) -> tuple[int, str, bytes]:
    host, port = endpoint.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
    try:
        connection.request(
            "POST",
            f"/v2/local{path}",
            body=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, response.getheader("content-type") or "", response.read()
    finally:
        connection.close()


def assert_openai_error(status: int, raw: bytes) -> None:
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == status and body["error"]["type"], body


def assert_ends(endpoint: LocalEndpoint, job_id: str) -> str:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        _, status = endpoint.call("GET", f"/status/{job_id}")
        if status["status"] in {"COMPLETED", "FAILED"}:
            return str(status["status"])
        assert time.monotonic() < deadline, f"job still {status['status']} after {DEADLINE_S} s"
        time.sleep(0.02)


@fuzz_settings(ENDPOINT_EXAMPLES)
@given(value=hostile_json())
def test_run_refuses_or_finishes_every_job(endpoint: LocalEndpoint, value: bytes) -> None:
    status, _, raw = post(endpoint, "/run", b'{"input": ' + value + b"}")
    if status == 200:
        assert_ends(endpoint, json.loads(raw)["id"])
    else:
        assert 400 <= status < 500, raw[:300]
        assert_openai_error(status, raw)


@fuzz_settings(ENDPOINT_EXAMPLES)
@given(data=st.data(), value=hostile_json())
def test_openai_route_answers_every_request(
    endpoint: LocalEndpoint, data: st.DataObject, value: bytes
) -> None:
    body = data.draw(openai_bodies(value))
    status, content_type, raw = post(endpoint, "/openai/v1/chat/completions", body)
    if content_type.startswith("text/event-stream"):
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
    elif status == 200:
        assert json.loads(raw)["object"] == "chat.completion"
    else:  # refused at submission, or the job failed: either way an OpenAI error
        assert_openai_error(status, raw)


def test_nothing_is_left_queued_or_running(endpoint: LocalEndpoint) -> None:
    def idle() -> bool:
        jobs = endpoint.call("GET", "/health")[1]["jobs"]
        return (jobs["inQueue"], jobs["inProgress"]) == (0, 0)

    endpoint.wait_for(idle, "every job to end", timeout=DEADLINE_S)
