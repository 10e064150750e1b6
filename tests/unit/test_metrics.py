"""The worker's metrics server: a port it cannot bind costs the metrics, never the worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

# A worker's metrics start, as handler.worker does it, with the fake engine.
SERVE = """
import logging, os
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from handler.metrics import serve_metrics
from handler.settings import load_settings
from tests.fakes import FakeEngine
serve_metrics(load_settings(dict(os.environ)), FakeEngine())
print("worker goes on")
"""


def test_a_busy_metrics_port_costs_the_metrics_not_the_worker() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "WORKER_METRICS_PORT": str(port)}
        done = subprocess.run(
            [sys.executable, "-c", SERVE], env=env, capture_output=True, text=True, timeout=120
        )
    assert (done.returncode, done.stdout) == (0, "worker goes on\n"), done.stderr
    warning = (
        f"WARNING handler.metrics metrics: cannot serve on 127.0.0.1:{port} "
        "(Address already in use); the worker runs without them"
    )
    assert warning in done.stderr.splitlines()
