"""Tool calls with no parser setting (issue 15, issue 14 item 12): the default local setup, as
`make serve` runs it (SmolLM2 with configs/smollm2-tools.jinja), answers every tool_choice through
the OpenAI SDK because the worker detects the hermes parser from the chat template. Explicit
settings still win, and a wrong name stops the worker naming the variable.

The endpoint test starts a real engine: run it under the shared engine lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from handler import parsers
from handler.engine.args import build_args
from handler.settings import SettingsError, load_settings
from local_endpoint.harness import MODEL_ID, ROOT, TOOLS_TEMPLATE, LocalEndpoint, local_endpoint
from tests.integration.samples import CITY_SCHEMA, HERMES_CALL, LOOSE_TOOLS, TOOLS, WEATHER

pytestmark = pytest.mark.integration

PARSER_SETTINGS = ("TOOL_CALL_PARSER", "REASONING_PARSER", "ENABLE_AUTO_TOOL_CHOICE")
DETECTED = (
    "parsers: tool parser hermes (template: <tool_call> (Hermes JSON), from CHAT_TEMPLATE file); "
    "no reasoning parser (no thinking section in the chat template (CHAT_TEMPLATE file))"
)


def no_parser_setting(env: dict[str, str]) -> dict[str, str]:
    assert env["CHAT_TEMPLATE"] == str(TOOLS_TEMPLATE)
    return {k: v for k, v in env.items() if k not in PARSER_SETTINGS}


# --- the choice, through vLLM's own parser (no engine) ----------------------------------------


def test_every_parser_detection_can_choose_is_registered_in_vllm() -> None:
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    tools = {r.parser for r in parsers.TOOL_RULES} | set(parsers.TOOL_FAMILIES.values())
    reasoning = {r.parser for r in parsers.REASONING_RULES} | {parsers.THINK_DEFAULT}
    reasoning |= set(parsers.REASONING_FAMILIES.values())
    assert tools - set(ToolParserManager.list_registered()) == set()
    assert reasoning - set(ReasoningParserManager.list_registered()) == set()


def test_the_default_local_model_gets_the_hermes_parser(worker_env: dict[str, str]) -> None:
    args = build_args(load_settings(no_parser_setting(worker_env)))
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser) == (
        "hermes",
        True,
        "",  # vLLM's "no reasoning parser"
    )


def test_without_the_tool_template_nothing_is_detected(worker_env: dict[str, str]) -> None:
    env = {**no_parser_setting(worker_env), "CHAT_TEMPLATE": ""}
    args = build_args(load_settings(env))
    assert (args.tool_call_parser, args.enable_auto_tool_choice) == (None, False)


def test_explicit_settings_override_detection(worker_env: dict[str, str]) -> None:
    env = {**worker_env, "TOOL_CALL_PARSER": "pythonic", "REASONING_PARSER": "deepseek_r1"}
    args = build_args(load_settings(env))
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser) == (
        "pythonic",
        True,
        "deepseek_r1",
    )
    off = build_args(load_settings({**worker_env, "TOOL_CALL_PARSER": "none"}))
    assert (off.tool_call_parser, off.enable_auto_tool_choice) == (None, False)
    manual = build_args(load_settings({**worker_env, "ENABLE_AUTO_TOOL_CHOICE": "false"}))
    assert (manual.tool_call_parser, manual.enable_auto_tool_choice) == ("hermes", False)
    with pytest.raises(SettingsError, match="^REASONING_PARSER='r1': not a parser this vLLM has"):
        build_args(load_settings({**worker_env, "REASONING_PARSER": "r1"}))


def test_a_wrong_parser_name_stops_the_worker_naming_the_variable(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**os.environ, **worker_env, "TOOL_CALL_PARSER": "hermes3", "LMCACHE_ENABLED": "false"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    job = {"input": {"prompt": "hi", "sampling_params": {"max_tokens": 4}}}
    done = subprocess.run(
        [sys.executable, "-m", "handler", "--test_input", json.dumps(job)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "TOOL_CALL_PARSER='hermes3': not a parser this vLLM has" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


# --- the default local setup, end to end ------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]
) -> Iterator[LocalEndpoint]:
    env = no_parser_setting(worker_env)
    # the endpoint passes its own environment on: no parser setting may come from there either
    env.update({name: "" for name in PARSER_SETTINGS})
    with local_endpoint(tmp_path_factory.mktemp("tool-detection"), env) as started:
        yield started


@pytest.fixture(scope="module")
def client(endpoint: LocalEndpoint) -> openai.OpenAI:
    return endpoint.openai()


def calls(client: openai.OpenAI, **params: Any) -> tuple[list[tuple[str, str]], str | None]:
    """The tool calls (name, arguments) of a one-shot answer and its finish reason."""
    choice = client.chat.completions.create(model=MODEL_ID, messages=WEATHER, **params).choices[0]
    found = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return found, choice.finish_reason


def streamed_calls(client: openai.OpenAI, **params: Any) -> list[tuple[str, str]]:
    joined: dict[int, list[str]] = {}
    stream = client.chat.completions.create(model=MODEL_ID, messages=WEATHER, stream=True, **params)
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name_args = joined.setdefault(delta.index, ["", ""])
                name_args[0] += delta.function.name or "" if delta.function else ""
                name_args[1] += delta.function.arguments or "" if delta.function else ""
    return [(name, args) for name, args in (joined[i] for i in sorted(joined))]


def test_the_log_names_the_parser_and_the_signal(endpoint: LocalEndpoint) -> None:
    assert endpoint.log.read_text(errors="replace").count(DETECTED) == 1


def test_the_model_card_lists_tools(client: openai.OpenAI) -> None:
    [card] = client.models.list().data
    assert card.model_extra is not None
    [text] = card.model_extra["output_modalities"]
    described = list(text["supported_parameters"])
    assert ("tools" in described, "tool_choice" in described) == (True, True)
    assert "reasoning" not in described


def test_tool_choice_auto_is_parsed_by_the_detected_parser(client: openai.OpenAI) -> None:
    # SmolLM2-135M is made to write a Hermes call; the parser must turn it into a tool call
    params: dict[str, Any] = {
        "tools": LOOSE_TOOLS,
        "tool_choice": "auto",
        "max_tokens": 60,
        "extra_body": {"structured_outputs": {"regex": HERMES_CALL}},
    }
    found, finish = calls(client, **params)
    assert [(name, json.loads(args)) for name, args in found] == [("get_time", {"city": "Tokyo"})]
    assert finish == "tool_calls"
    streamed = streamed_calls(client, **params)
    assert [(name, json.loads(args)) for name, args in streamed] == [
        ("get_time", {"city": "Tokyo"})
    ]


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_forced_tool_choice_answers(client: openai.OpenAI, tool_choice: Any) -> None:
    params: dict[str, Any] = {
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": 60,
        "temperature": 0,
    }
    [(name, arguments)], _ = calls(client, **params)
    assert name in ({"get_weather", "get_time"} if tool_choice == "required" else {"get_weather"})
    jsonschema.validate(json.loads(arguments), CITY_SCHEMA)
    [(streamed_name, streamed_arguments)] = streamed_calls(client, **params)
    assert (streamed_name, json.loads(streamed_arguments)) == (name, json.loads(arguments))


def test_tools_without_tool_choice_are_answered(client: openai.OpenAI) -> None:
    # OpenAI's default with tools is auto: before detection this was a 400 in the default setup
    found, finish = calls(client, tools=TOOLS, max_tokens=40, temperature=0)
    assert finish in ("stop", "tool_calls", "length")
    for name, arguments in found:
        assert name in ("get_weather", "get_time")
        json.loads(arguments)
