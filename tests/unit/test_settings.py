from __future__ import annotations

import pytest

from handler.settings import Settings, SettingsError, env_names, load_settings, lora_specs


def test_defaults() -> None:
    s = load_settings({})
    assert (s.model, s.model_id, s.max_model_len, s.dtype) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        None,
        "auto",
    )
    assert (s.max_concurrency, s.default_max_tokens, s.flush_interval_s) == (32, 512, 0.05)
    assert s.engine_passthrough == {}


def test_the_stream_post_budget_follows_the_device_unless_set() -> None:
    unset = load_settings({})
    assert (unset.posts_per_s(on_cpu=False), unset.posts_per_s(on_cpu=True)) == (100.0, 40.0)
    for value, budget in [("250", 250.0), ("0", 0.0)]:
        chosen = load_settings({"STREAM_POSTS_PER_S": value})
        assert (chosen.posts_per_s(on_cpu=False), chosen.posts_per_s(on_cpu=True)) == (
            budget,
            budget,
        )
    with pytest.raises(SettingsError, match="STREAM_POSTS_PER_S"):
        load_settings({"STREAM_POSTS_PER_S": "-1"})


def test_official_worker_names_keep_their_meaning() -> None:
    s = load_settings(
        {
            "MODEL_NAME": "org/model",
            "MAX_MODEL_LEN": "4096",
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model",
            "MAX_CONCURRENCY": "8",
            "DTYPE": "bfloat16",
            "LOG_LEVEL": "debug",
            "MODEL_REVISION": "",
        }
    )
    assert (
        s.model,
        s.model_id,
        s.max_model_len,
        s.max_concurrency,
        s.dtype,
        s.log_level,
        s.model_revision,
    ) == ("org/model", "my-model", 4096, 8, "bfloat16", "DEBUG", None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_MODEL_LEN", "lots"),
        ("MAX_CONCURRENCY", "0"),
        ("DTYPE", "int3"),
        ("STREAM_FLUSH_INTERVAL_MS", "-1"),
        ("KV_CACHE_GB", "big"),
    ],
)
def test_malformed_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({name: value})
    assert str(caught.value).startswith(f"invalid setting: {name}={value!r}: ")


def test_other_upper_case_variables_are_kept_for_the_engine() -> None:
    env = {
        "TENSOR_PARALLEL_SIZE": "2",
        "ENABLE_PREFIX_CACHING": "true",
        "PATH": "/bin",
        "HOME": "/root",
        "lower_case": "x",
        "MAX_MODEL_LEN": "128",
    }
    assert load_settings(env).engine_passthrough == {
        "TENSOR_PARALLEL_SIZE": "2",
        "ENABLE_PREFIX_CACHING": "true",
    }


def test_settings_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        load_settings({}).max_concurrency = 3


def test_every_field_but_the_passthrough_has_an_environment_name() -> None:
    assert set(env_names().values()) == set(Settings.model_fields) - {"engine_passthrough"}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LORA_MODULES", "just-a-name", "expected name=path, got 'just-a-name'"),
        ("LORA_MODULES", '[{"name": "x"}]', 'expected JSON objects with "name" and "path"'),
        ("LORA_MODULES", "[oops", "not JSON"),
        ("PRICING_PROMPT", "cheap", "expected a decimal number of USD per token"),
        ("PRICING_COMPLETION", "-0.1", "expected a non-negative decimal number"),
        ("MAX_BATCH_REQUESTS", "0", "greater than 0"),
    ],
)
def test_malformed_model_settings(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({name: value})
    assert str(caught.value).startswith(f"invalid setting: {name}={value!r}: ")
    assert message in str(caught.value)


def test_lora_modules_in_both_spellings() -> None:
    assert lora_specs(" a=/x\tb=org/y ") == ["a=/x", "b=org/y"]
    assert lora_specs('{"name": "a", "path": "/x"}') == ['{"name": "a", "path": "/x"}']
    assert load_settings({"LORA_MODULES": "a=/x"}).lora_modules == "a=/x"
    assert load_settings({"LORA_MODULES": ""}).lora_modules is None


def test_blank_values_are_unset() -> None:
    s = load_settings({"MAX_MODEL_LEN": "", "LMCACHE_ENABLED": " ", "GPU_MEMORY_UTILIZATION": ""})
    assert (s.max_model_len, s.lmcache_enabled, s.engine_passthrough) == (None, True, {})


def test_listed_vllm_flags_are_checked_then_passed_on() -> None:
    s = load_settings({"GPU_MEMORY_UTILIZATION": "0.85", "KV_CACHE_DTYPE": "fp8"})
    assert s.gpu_memory_utilization == 0.85
    assert s.engine_passthrough == {"GPU_MEMORY_UTILIZATION": "0.85", "KV_CACHE_DTYPE": "fp8"}
    with pytest.raises(SettingsError, match="^invalid setting: GPU_MEMORY_UTILIZATION='1.5': "):
        load_settings({"GPU_MEMORY_UTILIZATION": "1.5"})
