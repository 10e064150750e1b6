"""Real vLLM engines on the default model (SmolLM2-135M-Instruct), shared by the session.

The settings are configs/local.env (configs/gpu.env under scripts/gpu-smoke) plus the converted
model that `make` points WORKER_TEST_MODEL at; vLLM reads its own variables (VLLM_CPU_*) from
the process, so they are applied there too.

SmolLM2 is served with its chat template plus a tool section (configs/smollm2-tools.jinja), as
`make serve` serves it; the worker detects the hermes tool parser from it. ``full_env`` adds what
the OpenAI-surface tests need: compact JSON mode and a LoRA adapter (``smol-lora``, made for the
session). The in-process ``engine`` also runs in float32, the setting under which a seeded request
gives the same text alone or in a batch on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.settings import Settings, apply_process_environment, load_settings
from local_endpoint.harness import ROOT, LocalEndpoint, local_endpoint, local_env

LORA = "smol-lora"


def make_offline(module: str, *args: str) -> None:
    """Run a test-model maker (``python -m tests.lora_adapter ...``) with the Hub offline."""
    subprocess.run(
        [sys.executable, "-m", module, *args],
        check=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
    )


@pytest.fixture(scope="session")
def worker_env() -> dict[str, str]:
    env = local_env()
    apply_process_environment(env)
    return env


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]) -> Path:
    out = tmp_path_factory.mktemp("lora") / "smol-lora"
    make_offline("tests.lora_adapter", worker_env["MODEL_NAME"], str(out))
    return out


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]) -> Path:
    """A tiny vision-language model (tests/tiny_vlm.py): SmolLM2 with a random vision tower."""
    out = tmp_path_factory.mktemp("vlm") / "tiny-vlm"
    make_offline("tests.tiny_vlm", worker_env["MODEL_NAME"], str(out))
    return out


@pytest.fixture(scope="session")
def full_env(worker_env: dict[str, str], lora_adapter: Path) -> dict[str, str]:
    return {
        **worker_env,
        # compact JSON: with free whitespace, JSON mode lets SmolLM2 emit blank lines until
        # max_tokens
        "STRUCTURED_OUTPUTS_CONFIG": '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "LORA_MODULES": f"{LORA}={lora_adapter}",
    }


@pytest.fixture(scope="session")
def settings(full_env: dict[str, str]) -> Settings:
    return load_settings({**full_env, "STREAM_FLUSH_INTERVAL_MS": "0", "DTYPE": "float32"})


@pytest.fixture(scope="session")
def openai_endpoint(
    tmp_path_factory: pytest.TempPathFactory, full_env: dict[str, str]
) -> Iterator[LocalEndpoint]:
    """A local endpoint with one real worker (bfloat16, LMCache on), for the SDK-driven suites."""
    with local_endpoint(tmp_path_factory.mktemp("endpoint"), full_env) as started:
        yield started


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[object]:
    from handler.engine.vllm_engine import VllmEngine

    vllm_engine = VllmEngine.start(settings)
    yield vllm_engine
    vllm_engine.shutdown()
