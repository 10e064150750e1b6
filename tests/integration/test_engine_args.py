"""Settings through vLLM's own `vllm serve` parser."""

from __future__ import annotations

import pytest

from handler.engine.args import build_args
from handler.settings import SettingsError, load_settings

pytestmark = pytest.mark.integration


def test_passthrough_reaches_vllm_args(worker_env: dict[str, str]) -> None:
    args = build_args(
        load_settings(
            {**worker_env, "ENABLE_PREFIX_CACHING": "false", "MAX_NUM_SEQS": "7", "SEED": "3"}
        )
    )
    assert (args.enable_prefix_caching, args.max_num_seqs, args.seed) == (False, 7, 3)
    assert (args.served_model_name, args.max_model_len, args.enforce_eager) == (
        ["SmolLM2-135M-Instruct"],
        2048,
        True,
    )


def test_malformed_passthrough_names_the_variable(worker_env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=r"^invalid MAX_NUM_BATCHED_TOKENS='many': "):
        build_args(load_settings({**worker_env, "MAX_NUM_BATCHED_TOKENS": "many"}))
    # the vLLM flags listed as settings are checked when the settings load
    with pytest.raises(SettingsError, match=r"^invalid setting: TENSOR_PARALLEL_SIZE='two': "):
        load_settings({**worker_env, "TENSOR_PARALLEL_SIZE": "two"})
