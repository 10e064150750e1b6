"""LMCache behind real workers: each worker runs its own LMCache server (multiprocess mode), and
the workers share a real redis-server on loopback. vLLM's own prefix cache is off here, so every
hit counted in ``usage.prompt_tokens_details.cached_tokens`` comes from LMCache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from handler.lmcache import free_port
from local_endpoint.harness import MODEL_ID, LocalEndpoint, local_endpoint

pytestmark = pytest.mark.integration

CHUNK = 256
STORE_DOWN = "unreachable: caching continues"


def document(topic: str) -> str:
    """About 1,600 prompt tokens: six full LMCache chunks and a partial one."""
    line = "the quick brown fox jumps over the lazy dog."
    return " ".join(f"{topic} {i}: {line}" for i in range(110))


class RedisServer:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.alive():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def alive(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def keys(self) -> int:
        return int(self.client().dbsize())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def cache_env(worker_env: dict[str, str], redis_port: int) -> dict[str, str]:
    return {
        **worker_env,
        "LMCACHE_L2_URL": f"redis://127.0.0.1:{redis_port}",
        "ENABLE_PREFIX_CACHING": "false",
    }


@pytest.fixture(scope="module")
def worker_b(
    tmp_path_factory: pytest.TempPathFactory,
    worker_env: dict[str, str],
    redis_server: RedisServer,
) -> Iterator[LocalEndpoint]:
    env = cache_env(worker_env, redis_server.port)
    with local_endpoint(tmp_path_factory.mktemp("worker-b"), env) as endpoint:
        yield endpoint


def ask(endpoint: LocalEndpoint, doc: str) -> dict[str, Any]:
    """One chat request with ``doc`` as the system prompt; returns its usage."""
    status, body = endpoint.call(
        "POST",
        "/openai/v1/chat/completions",
        {
            "model": MODEL_ID,
            "messages": [
                {"role": "system", "content": doc},
                {"role": "user", "content": "Summarize."},
            ],
            "max_tokens": 1,
            "temperature": 0,
        },
        timeout=240,
    )
    assert status == 200, body
    return dict(body["usage"])


def remember(seen: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    seen.append(usage)
    return usage


def cached(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def full_chunks(usage: dict[str, Any]) -> int:
    """What LMCache can serve: every complete chunk before the last prompt token."""
    return (int(usage["prompt_tokens"]) - 1) // CHUNK * CHUNK


def l2_hit_tokens(endpoint: LocalEndpoint) -> float:
    # LMCache serves its labelled counters once the first lookup has happened
    return endpoint.worker_metric("lmcache_mp_lookup_hit_l2_tokens_total", default=0.0)


def cache_server(endpoint: LocalEndpoint) -> psutil.Process:
    worker = psutil.Process(endpoint.workers()[0]["pid"])
    for child in worker.children(recursive=True):
        if "lmcache.cli.main" in " ".join(child.cmdline()):
            return child
    raise AssertionError("the worker runs no LMCache server")


def log_count(endpoint: LocalEndpoint, text: str) -> int:
    return endpoint.log.read_text(errors="replace").count(text)


def test_hits_on_a_repeated_prefix_across_workers_and_restarts(
    tmp_path: Path,
    worker_env: dict[str, str],
    redis_server: RedisServer,
    worker_b: LocalEndpoint,
) -> None:
    doc = document("Item")
    env = cache_env(worker_env, redis_server.port)
    with local_endpoint(tmp_path, env) as worker_a:
        first = ask(worker_a, doc)
        hits = full_chunks(first)
        assert cached(first) == 0 and hits >= 5 * CHUNK
        assert cached(ask(worker_a, doc)) == hits  # from the RAM tier (L1)
        worker_a.wait_for(lambda: redis_server.keys() >= hits // CHUNK, "chunks in redis")

        # another worker, its own LMCache server, never saw the prompt: served from redis
        assert l2_hit_tokens(worker_b) == 0
        assert cached(ask(worker_b, doc)) == hits
        assert l2_hit_tokens(worker_b) == hits

        # worker A restarted: a new engine and LMCache server with an empty RAM tier
        old_pid = worker_a.workers()[0]["pid"]
        old_server = cache_server(worker_a)
        old_shm = {m.path for m in old_server.memory_maps() if m.path.startswith("/dev/shm/")}
        os.kill(old_pid, signal.SIGKILL)  # the worker's own process: its engine and server live on
        worker_a.wait_for(
            lambda: worker_a.workers()[0]["pid"] != old_pid and worker_a.workers()[0]["ready"],
            "worker A to come back",
            timeout=240,
        )
        assert not old_server.is_running() or old_server.status() == psutil.STATUS_ZOMBIE
        # the endpoint killed them, and removed the RAM tier they left in /dev/shm (if there)
        assert [path for path in old_shm if Path(path).exists()] == []
        assert cached(ask(worker_a, doc)) == hits
        assert l2_hit_tokens(worker_a) == hits


def test_a_prompt_shorter_than_one_chunk_asks_the_cache_server_nothing(
    worker_b: LocalEndpoint,
) -> None:
    """LMCache finds whole chunks only, so the worker answers a short prompt's lookup itself (0)
    and sends none; a long prompt's lookup still goes to the server, and hits. The server counts
    its lookups (``lmcache_mp_lookups_requests_total``) in the order they come, with their hit
    tokens."""

    def counted() -> tuple[float, float]:
        lookups = worker_b.worker_metric("lmcache_mp_lookups_requests_total", default=0.0)
        return lookups, worker_b.worker_metric("lmcache_mp_lookup_hit_tokens_total", default=0.0)

    doc = document("Bit")
    hits = full_chunks(ask(worker_b, doc))
    _, hit_tokens = counted()
    assert cached(ask(worker_b, doc)) == hits
    worker_b.wait_for(lambda: counted()[1] == hit_tokens + hits, "the hit counted", seen=counted)
    lookups, hit_tokens = counted()

    for n in range(3):
        short = ask(worker_b, f"A short note, {n}.")
        assert short["prompt_tokens"] < CHUNK and cached(short) == 0
    assert cached(ask(worker_b, doc)) == hits
    worker_b.wait_for(lambda: counted()[1] == hit_tokens + hits, "the hit counted", seen=counted)
    assert counted() == (lookups + 1, hit_tokens + hits)  # the long prompt's lookup only


def test_an_answer_is_stored_for_the_next_turn(worker_b: LocalEndpoint) -> None:
    """``LMCACHE_SAVE_DECODE`` (default true): the KV of generated tokens is stored chunk by
    chunk as it fills, so a next turn that sends the answer back finds it in the cache, not only
    the first prompt (vLLM's prefix cache is off here: every hit is LMCache's)."""

    def complete(prompt: str | list[int], tokens: int) -> dict[str, Any]:
        status, body = worker_b.call(
            "POST",
            "/openai/v1/completions",
            {
                "model": MODEL_ID,
                "prompt": prompt,
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
            timeout=240,
        )
        assert status == 200, body
        return dict(body)

    first = complete(document("Turn")[:1200], 300)
    prompt, answer = first["choices"][0]["prompt_token_ids"], first["choices"][0]["token_ids"]
    assert len(answer) == 300 and cached(first["usage"]) == 0
    # what has KV: the prompt and every answer token but the last (never fed to the model)
    stored = (len(prompt) + len(answer) - 1) // CHUNK * CHUNK
    assert stored > (len(prompt) - 1) // CHUNK * CHUNK  # more than the prompt's chunks
    follow_up = complete(prompt + answer + prompt[:20], 1)
    assert cached(follow_up["usage"]) == stored


def test_a_killed_cache_server_costs_recompute_then_comes_back(
    worker_b: LocalEndpoint,
) -> None:
    doc = document("Entry")
    cache_server(worker_b).kill()
    hits = full_chunks(ask(worker_b, doc))  # succeeds, whatever the cache does meanwhile
    for _ in range(2):
        ask(worker_b, doc)
    worker_b.wait_for(
        lambda: worker_b.worker_metric("worker_lmcache_restarts") == 1,
        "the LMCache server to be restarted",
        timeout=240,
    )
    last: list[dict[str, Any]] = []
    worker_b.wait_for(
        lambda: cached(remember(last, ask(worker_b, doc))) == hits,
        f"{hits} cached tokens after the restart",
        timeout=240,
        seen=lambda: last[-1:],
    )
    assert log_count(worker_b, "LMCache server exited") == 1
    assert log_count(worker_b, "LMCache server is back") == 1


def test_redis_going_away_and_coming_back(
    worker_b: LocalEndpoint, redis_server: RedisServer
) -> None:
    redis_server.stop()
    doc = document("Piece")
    first = ask(worker_b, doc)
    assert cached(first) == 0
    assert cached(ask(worker_b, doc)) == full_chunks(first)  # the RAM tier still serves
    worker_b.wait_for(
        lambda: log_count(worker_b, STORE_DOWN) == 1,
        "one warning about the store",
        timeout=120,
        seen=lambda: f"{log_count(worker_b, STORE_DOWN)} warnings",
    )

    redis_server.start()
    worker_b.wait_for(
        lambda: log_count(worker_b, "is back: restarting the LMCache server") == 1,
        "the worker to reconnect",
    )
    worker_b.wait_for(lambda: _healthy(worker_b), "the LMCache server to serve", timeout=120)
    other = document("Thing")
    worker_b.wait_for(
        lambda: cached(ask(worker_b, other)) > 0 and redis_server.keys() >= 5,
        "new chunks to reach redis again",
        timeout=240,
    )


def test_redis_down_at_start(tmp_path: Path, worker_env: dict[str, str]) -> None:
    later = RedisServer(free_port(), tmp_path)
    env = cache_env(worker_env, later.port)
    with local_endpoint(tmp_path, env) as worker:
        doc = document("Line")
        first = ask(worker, doc)
        assert cached(first) == 0
        assert cached(ask(worker, doc)) == full_chunks(first)
        worker.wait_for(lambda: log_count(worker, STORE_DOWN) == 1, "the store warning")
        later.start()
        try:
            worker.wait_for(
                lambda: log_count(worker, "is back: restarting") == 1, "the worker to connect"
            )
            worker.wait_for(lambda: _healthy(worker), "the LMCache server to serve", 120)
            worker.wait_for(
                lambda: cached(ask(worker, document("Row"))) > 0 and later.keys() >= 5,
                "chunks to reach redis",
                timeout=120,
            )
        finally:
            later.stop()


def _healthy(endpoint: LocalEndpoint) -> bool:
    """The worker's LMCache server answers (its counters are re-served by the worker)."""
    url = endpoint.workers()[0]["metrics_url"]
    with urllib.request.urlopen(url, timeout=10) as response:
        return "lmcache_mp_" in response.read().decode()
