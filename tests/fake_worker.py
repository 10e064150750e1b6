"""A worker process like ``python -m handler``, but with the fake engine: runpod's real production
loop (webhooks, JobScaler, per-job stop) around the real handler, with no vLLM. The local
endpoint runs it with ``--worker-module tests.fake_worker``.

``FAKE_ENGINE_PAUSE`` (seconds before each streamed event) makes streams last long enough to
cancel; ``WORKER_METRICS_PORT`` serves the fake engine's running-request gauge, as the real
worker does.
"""

from __future__ import annotations

import os

from handler import job_loop
from handler.jobs import make_handler
from handler.metrics import serve_metrics
from handler.settings import apply_process_environment, load_settings
from handler.worker import RUNPOD_LOG_DEFAULTS, configure_logging, runpod_config
from tests.fakes import FakeEngine


def main() -> None:
    apply_process_environment(RUNPOD_LOG_DEFAULTS)
    settings = load_settings({**os.environ, "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "fake-model"})
    configure_logging(settings)
    engine = FakeEngine(pause=float(os.environ.get("FAKE_ENGINE_PAUSE", "0")))
    serve_metrics(settings, engine)
    job_loop.start(
        runpod_config(settings, make_handler(engine, settings)), settings.shutdown_grace_s
    )


if __name__ == "__main__":
    main()
