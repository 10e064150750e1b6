"""Issue 14 against a real worker (vLLM on SmolLM2 under runpod's production loop): a one-shot
OpenAI-route request whose client leaves stops generating, and a worker group killed outright
leaves nothing in /dev/shm."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from local_endpoint.harness import ABORTED, KEY, MODEL_ID, LocalEndpoint

pytestmark = pytest.mark.integration

RUNNING = "worker_engine_running_requests"


def test_a_one_shot_chat_whose_client_disconnects_stops_generating(
    openai_endpoint: LocalEndpoint,
) -> None:
    endpoint = openai_endpoint
    cancelled = endpoint.call("GET", "/health")[1]["jobs"]["cancelled"]
    aborted = endpoint.log_count(ABORTED)
    body = json.dumps(
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500,
            "ignore_eos": True,
        }
    ).encode()
    port = int(endpoint.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /v2/local/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        endpoint.wait_for(lambda: endpoint.worker_metric(RUNNING) == 1, "generation", 120)
    # the worker says it aborted the engine request (1500 tokens did not finish by themselves)
    endpoint.wait_for(lambda: endpoint.log_count(ABORTED) == aborted + 1, "the abort")
    assert endpoint.worker_metric(RUNNING) == 0
    assert endpoint.call("GET", "/health")[1]["jobs"]["cancelled"] == cancelled + 1
    assert endpoint.workers()[0]["jobs_in_progress"] == 0


def test_a_killed_worker_group_leaves_nothing_in_dev_shm(openai_endpoint: LocalEndpoint) -> None:
    endpoint = openai_endpoint
    shm = Path("/dev/shm")
    victim = endpoint.workers()[0]
    held = {
        entry.name
        for entry in shm.iterdir()
        if entry.stat().st_ino in _inodes_mapped_by_group(victim["pid"])
    }
    os.killpg(victim["pid"], signal.SIGKILL)
    endpoint.wait_for(
        lambda: (
            endpoint.workers()[0]["starts"] == victim["starts"] + 1
            and endpoint.workers()[0]["ready"]
        ),
        "the worker to be replaced",
        timeout=300,
    )
    assert held, "the worker's group held nothing in /dev/shm to begin with"
    assert [name for name in held if (shm / name).exists()] == []


def _inodes_mapped_by_group(pgid: int) -> set[int]:
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                    inodes.add(int(fields[4]))
        except OSError:
            continue
    return inodes
