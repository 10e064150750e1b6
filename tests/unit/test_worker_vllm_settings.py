"""RunPod's official worker's variables (runpod-workers/worker-vllm) read with its meaning: aliases,
MAX_MODEL_LEN's spellings, 0 as unset, the speculative-decoding variables, VLLM_CONFIG_FILE; and
the start-up warning's list of variables named like vLLM flags that vLLM does not have."""

from __future__ import annotations

import json

import pytest

from handler.engine.args import owned_args
from handler.settings import (
    SettingsError,
    load_settings,
    speculative_config,
    unknown_variables,
    worker_vllm_environment,
)

# flags of a parser shaped like vLLM's
OPTIONS = [
    "--tensor-parallel-size",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--chat-template",
    "--response-role",
    "--speculative-config",
    "--ssl-certfile",
]


def test_aliases_take_their_targets_meaning() -> None:
    s = load_settings(
        {
            "SERVED_MODEL_NAME": "smol",
            "TOKENIZER": "org/tok",
            "CUSTOM_CHAT_TEMPLATE": "{{ messages }}",
            "OPENAI_RESPONSE_ROLE": "assistant",
        }
    )
    assert (s.model_id, s.tokenizer) == ("smol", "org/tok")
    assert s.engine_passthrough == {"CHAT_TEMPLATE": "{{ messages }}", "RESPONSE_ROLE": "assistant"}


def test_an_alias_agreeing_with_its_target_is_fine_and_a_disagreeing_one_stops() -> None:
    same = {"SERVED_MODEL_NAME": "a", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "a"}
    assert load_settings(same).model_id == "a"
    with pytest.raises(SettingsError, match="SERVED_MODEL_NAME and OPENAI_SERVED_MODEL_NAME"):
        load_settings({"SERVED_MODEL_NAME": "a", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "b"})


def test_the_callers_environment_is_not_changed() -> None:
    env = {"TOKENIZER": "t", "MAX_NUM_BATCHED_TOKENS": "0", "SPECULATIVE_MODEL": "m"}
    worker_vllm_environment(env)
    assert env == {"TOKENIZER": "t", "MAX_NUM_BATCHED_TOKENS": "0", "SPECULATIVE_MODEL": "m"}


@pytest.mark.parametrize(
    ("value", "length"),
    [
        ("auto", -1),
        ("AUTO", -1),
        ("-1", -1),
        ("0", None),
        ("", None),
        ("4096", 4096),
        ("32k", 32000),
        ("32K", 32768),
        ("1.5k", 1500),
        (" 2048 ", 2048),
    ],
)
def test_max_model_len_spellings(value: str, length: int | None) -> None:
    assert load_settings({"MAX_MODEL_LEN": value}).max_model_len == length


@pytest.mark.parametrize("value", ["-2", "lots", "1.5K", "32kb"])
def test_max_model_len_nonsense_stops_the_worker(value: str) -> None:
    with pytest.raises(SettingsError, match="^invalid setting: MAX_MODEL_LEN="):
        load_settings({"MAX_MODEL_LEN": value})


def test_auto_context_length_reaches_vllm_as_minus_one() -> None:
    argv = owned_args(load_settings({"MAX_MODEL_LEN": "auto"}))
    assert argv[argv.index("--max-model-len") + 1] == "-1"


def test_max_num_batched_tokens_zero_is_unset() -> None:
    assert (
        "MAX_NUM_BATCHED_TOKENS"
        not in load_settings({"MAX_NUM_BATCHED_TOKENS": "0"}).engine_passthrough
    )
    kept = load_settings({"MAX_NUM_BATCHED_TOKENS": "8192"}).engine_passthrough
    assert kept == {"MAX_NUM_BATCHED_TOKENS": "8192"}


@pytest.mark.parametrize(
    ("env", "config"),
    [
        (
            {"SPECULATIVE_MODEL": "org/Llama-EAGLE3-draft", "NUM_SPECULATIVE_TOKENS": "3"},
            {"model": "org/Llama-EAGLE3-draft", "num_speculative_tokens": 3, "method": "eagle3"},
        ),
        ({"SPECULATIVE_MODEL": "org/eagle-x"}, {"model": "org/eagle-x", "method": "eagle"}),
        ({"SPECULATIVE_MODEL": "org/medusa"}, {"model": "org/medusa", "method": "medusa"}),
        ({"SPECULATIVE_MODEL": "org/small"}, {"model": "org/small", "method": "draft_model"}),
        (
            {"NGRAM_PROMPT_LOOKUP_MAX": "4", "NUM_SPECULATIVE_TOKENS": "0"},
            {"prompt_lookup_max": 4, "method": "ngram"},
        ),
        (
            {"SPECULATIVE_METHOD": "mtp", "SPECULATIVE_ENFORCE_EAGER": "true"},
            {"method": "mtp", "enforce_eager": True},
        ),
        ({"NUM_SPECULATIVE_TOKENS": "3"}, None),
        ({}, None),
    ],
)
def test_speculative_variables_as_worker_vllm_v2_assembled_them(
    env: dict[str, str], config: dict[str, object] | None
) -> None:
    assert speculative_config(env) == config


def test_speculative_variables_become_speculative_config() -> None:
    s = load_settings({"SPECULATIVE_MODEL": "org/small", "NUM_SPECULATIVE_TOKENS": "5"})
    assert s.engine_passthrough.keys() == {"SPECULATIVE_CONFIG"}
    assert json.loads(s.engine_passthrough["SPECULATIVE_CONFIG"]) == {
        "model": "org/small",
        "num_speculative_tokens": 5,
        "method": "draft_model",
    }
    alone = load_settings({"NUM_SPECULATIVE_TOKENS": "3", "NGRAM_PROMPT_LOOKUP_MIN": "0"})
    assert alone.engine_passthrough == {"NUM_SPECULATIVE_TOKENS": "3"}  # warned at start


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SPECULATIVE_MODEL": "m", "SPECULATIVE_CONFIG": "{}"}, "SPECULATIVE_CONFIG only"),
        ({"SPECULATIVE_METHOD": "ngram", "NGRAM_PROMPT_LOOKUP_MAX": "four"}, "NGRAM_PROMPT"),
    ],
)
def test_speculative_conflicts_stop_the_worker(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        load_settings(env)


def test_vllm_config_file_is_vllms_config_flag() -> None:
    s = load_settings({"VLLM_CONFIG_FILE": "/etc/vllm.yaml", "MAX_NUM_SEQS": "8"})
    argv = owned_args(s)
    assert argv[argv.index("--config") + 1] == "/etc/vllm.yaml"
    assert s.engine_passthrough == {"MAX_NUM_SEQS": "8"}


def test_unknown_flag_names_are_listed_with_advice() -> None:
    names = [
        "TENSOR_PARALLEL_SIZE",  # a flag
        "TENSOR_PARALEL_SIZE",  # a typo
        "MAX_NUM_SEQUENCES",  # shaped like the MAX_ flags
        "SWAP_SPACE",  # worker-vllm's, gone from vLLM
        "DEFAULT_BATCH_SIZE",
        "VLLM_EXTRA_ARGS",
        "NUM_SPECULATIVE_TOKENS",
        "VLLM_USE_DEEP_GEMM",  # vLLM's own environment
        "CUDA_VISIBLE_DEVICES",
        "SSL_CERT_FILE",  # OpenSSL's, though close to --ssl-certfile
        "HOSTNAME",
        "CONTAINER_NAME",  # nothing like a flag
    ]
    assert unknown_variables(names, OPTIONS) == [
        "DEFAULT_BATCH_SIZE (streams are batched by time here: STREAM_FLUSH_INTERVAL_MS, "
        "STREAM_POSTS_PER_S)",
        "MAX_NUM_SEQUENCES",
        "NUM_SPECULATIVE_TOKENS (used only beside SPECULATIVE_METHOD, SPECULATIVE_MODEL or "
        "NGRAM_PROMPT_LOOKUP_MAX)",
        "SWAP_SPACE (gone from vLLM; LMCache's RAM tier, LMCACHE_L1_SIZE_GB, keeps KV caches)",
        "TENSOR_PARALEL_SIZE (did you mean TENSOR_PARALLEL_SIZE?)",
        "VLLM_EXTRA_ARGS (one variable per flag, named like it: TENSOR_PARALLEL_SIZE=2)",
    ]
