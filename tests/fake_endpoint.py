"""The local endpoint with fake-engine workers (:mod:`tests.fake_worker`), for the fast tests."""

from __future__ import annotations

import contextlib
from pathlib import Path

from local_endpoint.harness import LocalEndpoint, local_endpoint


def fake_endpoint(
    tmp: Path, pause: float, *args: str, **env: str
) -> contextlib.AbstractContextManager[LocalEndpoint]:
    """The endpoint with fake-engine workers (``tests.fake_worker``, ``pause`` seconds per
    streamed event) under runpod's real loop, a 5 s job-take hold, and ``args``."""
    return local_endpoint(
        tmp,
        {"FAKE_ENGINE_PAUSE": str(pause), "STREAM_FLUSH_INTERVAL_MS": "0", **env},
        "--worker-module",
        "tests.fake_worker",
        "--take-timeout-s",
        "5",
        *args,
        start_timeout=60,
    )
