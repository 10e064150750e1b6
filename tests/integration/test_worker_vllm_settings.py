"""RunPod's official worker's variables through vLLM's own ``vllm serve`` parser: its Hub form's
defaults (``.runpod/hub.json`` at worker-vllm commit 7a92503, as the form sends them: strings)
start this worker with one warning naming what does nothing here; its aliases, speculative
variables, ``MAX_MODEL_LEN`` spellings and ``VLLM_CONFIG_FILE`` reach vLLM's arguments."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from handler.engine.args import build_args
from handler.settings import load_settings

pytestmark = pytest.mark.integration

HUB_DEFAULTS = {
    "TOKENIZER_MODE": "auto",
    "SKIP_TOKENIZER_INIT": "false",
    "TRUST_REMOTE_CODE": "false",
    "DTYPE": "auto",
    "KV_CACHE_DTYPE": "auto",
    "MAX_MODEL_LEN": "auto",
    "DISTRIBUTED_EXECUTOR_BACKEND": "mp",
    "RAY_WORKERS_USE_NSIGHT": "false",
    "PIPELINE_PARALLEL_SIZE": "1",
    "TENSOR_PARALLEL_SIZE": "1",
    "MAX_PARALLEL_LOADING_WORKERS": "1",
    "ENABLE_PREFIX_CACHING": "false",
    "DISABLE_SLIDING_WINDOW": "false",
    "SEED": "0",
    "MAX_NUM_SEQS": "256",
    "MAX_LOGPROBS": "20",
    "DISABLE_LOG_STATS": "false",
    "ENABLE_LORA": "false",
    "MAX_LORAS": "1",
    "MAX_LORA_RANK": "16",
    "LORA_DTYPE": "auto",
    "FULLY_SHARDED_LORAS": "false",
    "DEVICE": "auto",
    "SCHEDULER_DELAY_FACTOR": "0",
    "ENABLE_CHUNKED_PREFILL": "true",
    "ENABLE_LOG_REQUESTS": "false",
    "GPU_MEMORY_UTILIZATION": "0.95",
    "BLOCK_SIZE": "16",
    "ENFORCE_EAGER": "false",
    "DISABLE_CUSTOM_ALL_REDUCE": "false",
    "DEFAULT_BATCH_SIZE": "50",
    "DEFAULT_MIN_BATCH_SIZE": "1",
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "3",
    "RAW_OPENAI_OUTPUT": "true",
    "OPENAI_RESPONSE_ROLE": "assistant",
    "MAX_CONCURRENCY": "30",
    "ENABLE_EXPERT_PARALLEL": "false",
    "BASE_PATH": "/runpod-volume",
    "ENABLE_AUTO_TOOL_CHOICE": "false",
    "PYTORCH_ALLOC_CONF": "expandable_segments:True",
    "VLLM_USE_DEEP_GEMM": "0",
}
RETIRED = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR",
    "DEFAULT_MIN_BATCH_SIZE",
    "DEVICE",
    "RAW_OPENAI_OUTPUT",
    "SCHEDULER_DELAY_FACTOR",
]


def test_hub_defaults_start_with_one_warning_naming_what_does_nothing(
    worker_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="handler.engine")
    args = build_args(load_settings({**worker_env, **HUB_DEFAULTS}))
    assert (args.max_model_len, args.response_role, args.max_num_seqs) == (-1, "assistant", 256)
    [warning] = [r.getMessage() for r in caplog.records if "not vLLM flags" in r.getMessage()]
    named = [part.split(" ")[0] for part in warning.split(": ", 1)[1].split("; ")]
    assert named == RETIRED


def test_aliases_and_speculative_variables_reach_vllm(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "vllm.yaml"
    config.write_text("max-num-seqs: 3\nseed: 11\n")
    env = {
        **worker_env,
        "SERVED_MODEL_NAME": worker_env["OPENAI_SERVED_MODEL_NAME_OVERRIDE"],
        "CUSTOM_CHAT_TEMPLATE": "{{ messages[0]['content'] }}",
        "MAX_MODEL_LEN": "1K",
        "MAX_NUM_BATCHED_TOKENS": "0",
        "NGRAM_PROMPT_LOOKUP_MAX": "4",
        "NUM_SPECULATIVE_TOKENS": "3",
        "VLLM_CONFIG_FILE": str(config),
    }
    env.pop("CHAT_TEMPLATE")
    args = build_args(load_settings(env))
    assert args.chat_template == "{{ messages[0]['content'] }}"
    assert (args.max_model_len, args.max_num_batched_tokens) == (1024, None)
    assert args.speculative_config == {
        "prompt_lookup_max": 4,
        "num_speculative_tokens": 3,
        "method": "ngram",
    }
    # the config file's keys, under the variables set here (MAX_NUM_SEQS in configs/local.env)
    assert (args.seed, args.max_num_seqs) == (11, int(worker_env["MAX_NUM_SEQS"]))
