"""Soak: mixed traffic, 16 clients at once, through the OpenAI SDK, the local endpoint and one real
worker (runpod's production loop, vLLM, LMCache), for ``SOAK_S`` seconds (60 in CI; ``make soak``
runs the documented 30 minutes).

Each client loops over four kinds of request:

* **streamed** chat and **one-shot** completions whose output a regex forces to spell a code
  unique to that request, so an output that is lost, cut, reordered or another request's shows;
* **cancelled**: a long stream the client hangs up on after its first chunks;
* **invalid**: a negative ``max_tokens``, an unknown model, malformed messages; each must raise
  the SDK's exception for its status with OpenAI's error body.

A request whose connection could not be opened (the SDK's 5 s connect timeout, missed once in a
CI-like run while the machine was saturated) is sent again, at most twice: it never reached the
endpoint. Then: every request ended as it should (none lost or mixed), the worker's resident
memory (it and its engine and cache-server processes) stayed within 10% of its level after
warm-up, and no engine request, job or queued job is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import openai
import psutil
import pytest

from local_endpoint.harness import MODEL_ID, LocalEndpoint

pytestmark = pytest.mark.integration

DURATION_S = float(os.environ.get("SOAK_S", "60"))
WARMUP_S = max(15.0, DURATION_S / 4)
CLIENTS = 16
SAMPLE_S = 2.0


def code(tag: str) -> str:
    return f"code {tag} ok"


def regex(tag: str) -> dict[str, Any]:
    return {"structured_outputs": {"regex": code(tag)}}


async def streamed(client: openai.AsyncOpenAI, tag: str) -> str | None:
    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": f"Repeat: {code(tag)}"}],
        max_tokens=40,
        stream=True,
        extra_body=regex(tag),
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    if text != code(tag) or finish != "stop" or len({c.id for c in chunks}) != 1:
        return f"streamed {tag}: {text!r}, finish {finish}, ids {len({c.id for c in chunks})}"
    return None


async def one_shot(client: openai.AsyncOpenAI, tag: str) -> str | None:
    answer = await client.completions.create(
        model=MODEL_ID, prompt=f"Repeat: {code(tag)}\n", max_tokens=40, extra_body=regex(tag)
    )
    text, finish = answer.choices[0].text, answer.choices[0].finish_reason
    if text != code(tag) or finish != "stop":
        return f"one-shot {tag}: {text!r}, finish {finish}"
    return None


async def cancelled(client: openai.AsyncOpenAI, tag: str) -> str | None:
    stream = await client.completions.create(
        model=MODEL_ID,
        prompt=f"Story {tag}:",
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].text)
        if seen >= 2:
            break
    await stream.close()
    return None if seen >= 2 else f"cancelled {tag}: {seen} chunks before the hang-up"


BAD: list[tuple[dict[str, Any], type[openai.APIStatusError], int]] = [
    ({"model": MODEL_ID, "max_tokens": -1}, openai.BadRequestError, 400),
    ({"model": "no-such-model"}, openai.NotFoundError, 404),
    ({"model": MODEL_ID, "messages": "hello"}, openai.BadRequestError, 400),
]


async def invalid(client: openai.AsyncOpenAI, tag: str) -> str | None:
    request, error, status = BAD[int(tag[-4:]) % len(BAD)]
    body = {"messages": [{"role": "user", "content": "hi"}], **request}
    try:
        await client.chat.completions.create(**body)
    except error as exc:
        fields = set(exc.body) if isinstance(exc.body, dict) else set()
        if exc.status_code == status and fields == {"message", "type", "param", "code"}:
            return None
        return f"invalid {tag}: {exc.status_code} {exc.body}"
    return f"invalid {tag}: accepted {request}"


KINDS: dict[str, Callable[[openai.AsyncOpenAI, str], Awaitable[str | None]]] = {
    "streamed": streamed,
    "one-shot": one_shot,
    "cancelled": cancelled,
    "invalid": invalid,
}


class MemoryWatch:
    """Resident memory of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(SAMPLE_S):
            self.samples.append((time.monotonic() - started, self.rss()))

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def never_sent(exc: BaseException) -> bool:
    """The SDK could not open its connection (its connect timeout is 5 s, which a client
    process starved of CPU on a saturated machine can miss): the request never reached the
    endpoint, so sending it again cannot duplicate or hide a lost job."""
    return isinstance(exc, openai.APIConnectionError) and isinstance(
        exc.__cause__, httpx2.ConnectTimeout | httpx2.ConnectError
    )


async def traffic(endpoint: LocalEndpoint, until: float) -> tuple[Counter[str], list[str]]:
    client = endpoint.async_openai()
    done: Counter[str] = Counter()
    failures: list[str] = []
    names = list(KINDS)

    async def lane(i: int) -> None:
        n = 0
        while time.monotonic() < until:
            kind = names[(i + n) % len(names)]
            tag = f"{i:02d}x{n:04d}"
            n += 1
            for attempt in range(3):
                try:
                    failure = await asyncio.wait_for(KINDS[kind](client, tag), timeout=300)
                except Exception as exc:
                    if never_sent(exc) and attempt < 2:
                        done["connect retried"] += 1
                        continue
                    failure = f"{kind} {tag}: {type(exc).__name__}: {exc}"
                break
            done[kind] += 1
            if failure:
                failures.append(failure)

    try:
        await asyncio.gather(*(lane(i) for i in range(CLIENTS)))
    finally:
        await client.close()
    return done, failures


@pytest.mark.timeout(DURATION_S + 600)
def test_soak_mixed_traffic(openai_endpoint: LocalEndpoint) -> None:
    endpoint = openai_endpoint
    [worker] = endpoint.workers()
    with MemoryWatch(int(worker["pid"])) as memory:
        done, failures = asyncio.run(traffic(endpoint, time.monotonic() + DURATION_S))

    assert failures == [], f"{len(failures)} of {sum(done.values())} requests: {failures[:10]}"
    retried = done.pop("connect retried", 0)
    assert set(done) == set(KINDS) and min(done.values()) >= CLIENTS // 4, done

    after = [rss for at, rss in memory.samples if at >= WARMUP_S]
    assert after, "no memory sample after warm-up"
    growth = max(after) / after[0]
    mib = [round(rss / 2**20) for _, rss in memory.samples]
    print(  # shown by `make soak`
        f"\nsoak: {DURATION_S:.0f} s, {CLIENTS} clients, requests {dict(done)} ({retried} sent "
        f"again after a connection that could not be opened); worker memory "
        f"after warm-up {mib[len(mib) - len(after)]} MiB, at most {max(after) // 2**20} MiB "
        f"({growth:.3f}x), at the end {mib[-1]} MiB"
    )
    assert growth <= 1.10, f"resident memory grew {growth:.2f}x after warm-up (MiB: {mib})"

    endpoint.wait_for(
        lambda: endpoint.worker_metric("worker_engine_running_requests") == 0,
        "the engine to have no request left",
        timeout=30,
    )
    _, health = endpoint.call("GET", "/health")
    assert (health["jobs"]["inProgress"], health["jobs"]["inQueue"]) == (0, 0), health
    assert endpoint.workers()[0]["jobs_in_progress"] == 0
