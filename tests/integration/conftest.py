"""One real vLLM engine on the default model (SmolLM2-135M-Instruct), shared by the session.

The settings are configs/local.env plus the converted model that `make` points WORKER_TEST_MODEL
at; vLLM reads its own variables (VLLM_CPU_*) from the process, so they are applied there too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.settings import Settings, apply_process_environment, load_settings

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "SmolLM2-135M-Instruct"


def local_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (ROOT / "configs" / "local.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    model = os.environ.get("WORKER_TEST_MODEL")
    if not model:
        pytest.fail("WORKER_TEST_MODEL is not set: run the tests with `make test`")
    env["MODEL_NAME"] = model
    return env


@pytest.fixture(scope="session")
def worker_env() -> dict[str, str]:
    env = local_env()
    apply_process_environment(env)
    return env


@pytest.fixture(scope="session")
def settings(worker_env: dict[str, str]) -> Settings:
    return load_settings({**worker_env, "STREAM_FLUSH_INTERVAL_MS": "0"})


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[object]:
    from handler.engine import VllmEngine

    vllm_engine = VllmEngine.start(settings)
    yield vllm_engine
    vllm_engine.shutdown()
