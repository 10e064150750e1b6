"""The pass-through of variables to vLLM flags, on a parser shaped like vLLM's (no vllm import)."""

from __future__ import annotations

import argparse
import json

import pytest

from handler.engine.args import build_args, owned_args, parser_error, passthrough_args
from handler.settings import SettingsError, load_settings


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    p.add_argument("--allowed-origins", nargs="+")
    p.add_argument("--ignore-patterns", nargs="+")
    p.add_argument("--api-key", nargs="+")
    p.add_argument("--root-path")
    p.add_argument("--served-model-name", nargs="+")
    return p


def test_variables_become_flags(parser: argparse.ArgumentParser) -> None:
    env = {
        "TENSOR_PARALLEL_SIZE": "2",
        "ENFORCE_EAGER": "true",
        "ENABLE_PREFIX_CACHING": "false",
        "IGNORE_PATTERNS": "a b",
        "NOT_A_FLAG": "1",
    }
    assert passthrough_args(parser, env) == [
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--ignore-patterns",
        "a",
        "b",
        "--tensor-parallel-size",
        "2",
    ]


@pytest.mark.parametrize("name", ["API_KEY", "VLLM_API_KEY", "ROOT_PATH"])
def test_server_flags_that_would_break_the_worker_stop_it(
    parser: argparse.ArgumentParser, name: str
) -> None:
    with pytest.raises(SettingsError, match=f"^{name}: not for the worker "):
        passthrough_args(parser, {name: "x", "ENFORCE_EAGER": "true"})


def test_other_server_flags_are_ignored_with_a_warning(
    parser: argparse.ArgumentParser, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="handler.engine")  # whatever earlier tests set
    assert passthrough_args(parser, {"ALLOWED_ORIGINS": "a b", "ENFORCE_EAGER": "1"}) == [
        "--enforce-eager"
    ]
    assert "ALLOWED_ORIGINS ignored" in caplog.text


def test_false_store_true_flag_is_left_out(parser: argparse.ArgumentParser) -> None:
    assert passthrough_args(parser, {"ENFORCE_EAGER": "0"}) == []


def test_bad_boolean_names_the_variable(parser: argparse.ArgumentParser) -> None:
    with pytest.raises(SettingsError, match="^ENFORCE_EAGER='sometimes': expected true or false$"):
        passthrough_args(parser, {"ENFORCE_EAGER": "sometimes"})


def test_flags_owned_by_settings_point_to_the_setting(parser: argparse.ArgumentParser) -> None:
    with pytest.raises(
        SettingsError, match="^SERVED_MODEL_NAME: set OPENAI_SERVED_MODEL_NAME_OVERRIDE instead$"
    ):
        passthrough_args(parser, {"SERVED_MODEL_NAME": "x"})


def test_owned_args() -> None:
    s = load_settings(
        {
            "MODEL_NAME": "/m",
            "MAX_MODEL_LEN": "2048",
            "KV_CACHE_GB": "1.5",
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "tiny",
        }
    )
    assert owned_args(s) == [
        "--model",
        "/m",
        "--served-model-name",
        "tiny",
        "--dtype",
        "auto",
        "--max-model-len",
        "2048",
        "--kv-cache-memory-bytes",
        str(int(1.5 * 2**30)),
        "--enable-prompt-tokens-details",
        "--enable-scale-out",
    ]


def test_lora_modules_enable_lora_with_one_slot_per_adapter() -> None:
    s = load_settings({"MODEL_NAME": "/m", "LORA_MODULES": "sql=/a/sql  chat=org/chat-lora"})
    assert owned_args(s)[6:] == [
        "--enable-lora",
        "--max-loras",
        "2",
        "--lora-modules",
        "sql=/a/sql",
        "chat=org/chat-lora",
        "--enable-prompt-tokens-details",
        "--enable-scale-out",
    ]
    as_json = '[{"name": "sql", "path": "/a/sql", "base_model_name": "m"}]'
    s = load_settings({"MODEL_NAME": "/m", "LORA_MODULES": as_json})
    assert owned_args(s)[9:11] == ["--lora-modules", json.dumps(json.loads(as_json)[0])]


def test_cpu_keeps_a_spare_lora_slot() -> None:
    s = load_settings({"MODEL_NAME": "/m", "LORA_MODULES": "sql=/a/sql"})
    assert owned_args(s, spare_lora_slot=True)[6:9] == ["--enable-lora", "--max-loras", "2"]


def test_adapters_by_name_turn_lora_on_with_vllms_slots() -> None:
    s = load_settings({"MODEL_NAME": "/m"})
    assert owned_args(s, runtime_lora=True)[6:] == [
        "--enable-lora",
        "--enable-prompt-tokens-details",
        "--enable-scale-out",
    ]
    s = load_settings({"MODEL_NAME": "/m", "LORA_MODULES": "sql=/a/sql"})
    assert owned_args(s, runtime_lora=True)[6:9] == ["--enable-lora", "--max-loras", "1"]


def test_vllms_own_lora_folder_resolver_is_refused_for_lora_dir() -> None:
    s = load_settings({"MODEL_NAME": "/m", "VLLM_LORA_RESOLVER_CACHE_DIR": "/runpod-volume/x"})
    with pytest.raises(SettingsError, match="VLLM_LORA_RESOLVER_CACHE_DIR: set LORA_DIR instead"):
        build_args(s)  # before vllm is imported


def testparser_errors_keep_the_reason_not_the_usage() -> None:
    stderr = (
        "usage: vllm [-h] [--model MODEL]\n"
        "             [model_tag]\n"
        "vllm: error: argument --structured-outputs-config: 1 validation error for X\n"
        "  Value error, only supported for xgrammar. [type=value_error]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    )
    assert parser_error(stderr) == (
        "argument --structured-outputs-config: 1 validation error for X "
        "Value error, only supported for xgrammar. [type=value_error]"
    )
    assert parser_error("") == "rejected by vLLM"
