"""Parser detection (handler/parsers.py) on a table of model families: each fixture is a model
folder whose chat template carries that family's real control tokens, cut down to the parts that
matter (the tool section, the tool-call rendering, the thinking section)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handler.parsers import ModelFiles, Parsers, choose, flags, read_model_files
from handler.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
# vLLM 0.32's registered names (ToolParserManager / ReasoningParserManager.list_registered());
# tests/integration/test_tool_detection.py checks every name detection can choose is still there.
TOOL_NAMES = frozenset(
    [
        "deepseek_v3",
        "deepseek_v31",
        "deepseek_v32",
        "functiongemma",
        "gemma4",
        "granite",
        "hermes",
        "kimi_k2",
        "llama3_json",
        "llama4_json",
        "llama4_pythonic",
        "mistral",
        "openai",
        "pythonic",
        "qwen3_coder",
        "qwen3_json",
        "qwen3_xml",
    ]
)
REASONING_NAMES = frozenset(
    ["deepseek_r1", "deepseek_v3", "gemma4", "granite", "mistral", "openai_gptoss", "qwen3"]
)

CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' + tool | tojson }}{%- endfor %}{{- '\\n</tools>\\nReturn each call as:\\n"
    '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>'
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.tool_calls %}{%- for tool_call in "
    "message.tool_calls %}{{- '<tool_call>\\n' }}{{- tool_call.function | tojson }}"
    "{{- '\\n</tool_call>' }}{%- endfor %}{%- else %}{{- '<|im_start|>' + message.role + '\\n' "
    "+ message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
)
QWEN3 = (
    CHATML_TOOLS + "{%- if '</think>' in content %}{%- set reasoning_content = "
    "content.split('</think>')[0] %}{%- endif %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is "
    "false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWQ = CHATML_TOOLS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"
QWEN3_CODER = (
    "{%- if tools %}<tools>{% for tool in tools %}<function>{{ tool.name }}</function>{% endfor %}"
    "</tools>{%- endif %}{%- for tool_call in message.tool_calls %}"
    "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
    "{{- '<parameter=' + args_name + '>\\n' }}{{- '</function>\\n</tool_call>' }}{%- endfor %}"
)
LLAMA_31 = (
    "{{- bos_token }}{%- if tools is not none and not tools_in_user_message %}"
    "{{- 'Environment: ipython\\n' }}{%- endif %}{%- for t in tools %}{{- t | tojson(indent=4) }}"
    "{%- endfor %}{%- if builtin_tools is defined and tool_call.name in builtin_tools %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{{- '<|python_tag|>' + "
    "tool_call.name + '.call(' }}{%- else %}{{- '{\"name\": \"' + tool_call.name + '\", ' }}"
    "{%- endif %}{%- if message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA_32 = LLAMA_31.replace("{{- '<|python_tag|>' + tool_call.name + '.call(' }}", "")
MISTRAL = (
    "{%- if tools is not none and (message == user_messages[-1]) %}{{- '[AVAILABLE_TOOLS] [' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- '][/AVAILABLE_TOOLS]' }}"
    "{%- endif %}{%- elif message.tool_calls is defined and message.tool_calls is not none %}"
    "{{- '[TOOL_CALLS] [' }}{%- for tool_call in message.tool_calls %}"
    "{{- tool_call.function | tojson }}{%- endfor %}{{- ']' + eos_token }}"
)
MAGISTRAL = MISTRAL + "{%- if message.thinking %}{{- '[THINK]' + message.thinking + '[/THINK]' }}"
DEEPSEEK_V3 = (
    "{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and "
    "message['tool_calls'] %}{%- for tool in message['tool_calls'] %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endfor %}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}"
)
DEEPSEEK_R1 = (
    DEEPSEEK_V3 + "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
DEEPSEEK_V31 = (
    "{% if not thinking is defined %}{% set thinking = false %}{% endif %}"
    "{%- for tool in message['tool_calls'] %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    "tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + "
    "'<｜tool▁call▁end｜>'}}{%- endfor %}{% if add_generation_prompt and thinking %}"
    "{{'<｜Assistant｜><think>'}}{% else %}{{'<｜Assistant｜></think>'}}{% endif %}"
)
GPT_OSS = (
    "{%- if tools -%}{{- '<|start|>developer<|message|>' }}{{- render_tool_namespace('functions', "
    "tools) }}{%- endif -%}{%- if message.tool_calls %}{{- '<|start|>assistant to=' }}"
    "{{- 'functions.' + tool_call.name + '<|channel|>commentary json<|message|>' }}"
    "{{- tool_call.arguments|tojson }}{{- '<|call|>' }}{%- elif message.thinking %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}"
)
GEMMA_3 = (
    "{{ bos_token }}{%- for message in loop_messages -%}{{ '<start_of_turn>' + role + '\\n' }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
GEMMA_4 = (
    "{%- if tools -%}{%- for tool in tools -%}{{- '<|tool>' + format_function_declaration(tool) "
    "+ '<tool|>' -}}{%- endfor -%}{%- endif -%}{%- if message['tool_calls'] -%}"
    "{%- for tool_call in message['tool_calls'] -%}{{- '<|tool_call>call:' + "
    "tool_call['function']['name'] + '{' -}}{{- '}<tool_call|>' -}}{%- endfor -%}{%- endif -%}"
    "{%- if enable_thinking -%}{{- '<|channel>thought\\n' -}}{%- endif -%}"
)
HERMES_2_PRO = [
    {"name": "default", "template": "{{bos_token}}{% for message in messages %}"
     "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
     "{% endfor %}"},
    {"name": "tool_use", "template": "{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
     "{{- '<tool_call>\\n' }}{{- tool_call.arguments | tojson }}{{- '</tool_call>' }}"},
]  # fmt: skip
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# renders tools, but in no format with a control token of its own
JSON_TOOLS = "{%- for t in tools %}{{- t | tojson }}{%- endfor %}{{- tool_call | tojson }}"


def folder(tmp_path: Path, template: object, model_type: str, jinja: bool = False) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if jinja:
        (tmp_path / "chat_template.jinja").write_text(str(template))
    elif template is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return tmp_path


FAMILIES = [
    # family, template, model_type, tool parser, reasoning parser, tool signal contains
    ("Qwen2.5", CHATML_TOOLS, "qwen2", "hermes", None, "<tool_call>"),
    ("Qwen3", QWEN3, "qwen3", "hermes", "qwen3", "<tool_call>"),
    ("QwQ", QWQ, "qwen2", "hermes", "deepseek_r1", "<tool_call>"),
    ("Qwen3-Coder", QWEN3_CODER, "qwen3_moe", "qwen3_coder", None, "<function="),
    ("Llama 3.1", LLAMA_31, "llama", "llama3_json", None, "<|python_tag|>"),
    ("Llama 3.2", LLAMA_32, "llama", "llama3_json", None, "ipython"),
    ("Mistral", MISTRAL, "mistral", "mistral", None, "[TOOL_CALLS]"),
    ("Magistral", MAGISTRAL, "mistral", "mistral", "mistral", "[TOOL_CALLS]"),
    ("DeepSeek V3", DEEPSEEK_V3, "deepseek_v3", "deepseek_v3", None, "```json"),
    ("DeepSeek R1", DEEPSEEK_R1, "deepseek_v3", "deepseek_v3", "deepseek_r1", "```json"),
    ("DeepSeek V3.1", DEEPSEEK_V31, "deepseek_v3", "deepseek_v31", "deepseek_v3", "DeepSeek"),
    ("gpt-oss", GPT_OSS, "gpt_oss", "openai", "openai_gptoss", "<|call|>"),
    ("Gemma 3", GEMMA_3, "gemma3", None, None, "does not render tools"),
    ("Gemma 4", GEMMA_4, "gemma4", "gemma4", "gemma4", "<|tool_call>"),
    ("Hermes 2 Pro", HERMES_2_PRO, "mistral", "hermes", None, "<tool_call>"),
    ("plain ChatML", CHATML, "llama", None, None, "does not render tools"),
    ("base model", None, "llama", None, None, "no chat template"),
    ("JSON tools, Llama config", JSON_TOOLS, "llama", "llama3_json", None, "config.json"),
    ("JSON tools, unknown family", JSON_TOOLS, "phi3", None, None, "no known tool-call format"),
]


@pytest.mark.parametrize(
    ("template", "model_type", "tool", "reasoning", "signal"),
    [row[1:] for row in FAMILIES],
    ids=[row[0] for row in FAMILIES],
)
def test_families(
    tmp_path: Path,
    template: object,
    model_type: str,
    tool: str | None,
    reasoning: str | None,
    signal: str,
) -> None:
    files = read_model_files(folder(tmp_path, template, model_type))
    chosen = choose(files, "auto", "auto", TOOL_NAMES, REASONING_NAMES)
    assert (chosen.tool_parser, chosen.reasoning_parser) == (tool, reasoning)
    assert signal in chosen.tool_signal


def test_the_shipped_smollm2_template_is_detected_as_hermes(tmp_path: Path) -> None:
    template = ROOT / "configs" / "smollm2-tools.jinja"
    files = read_model_files(folder(tmp_path, CHATML, "llama"), str(template))
    assert choose(files, "auto", "auto", TOOL_NAMES, REASONING_NAMES) == Parsers(
        "hermes",
        "template: <tool_call> (Hermes JSON), from CHAT_TEMPLATE file",
        None,
        "no thinking section in the chat template (CHAT_TEMPLATE file)",
    )


def test_chat_template_setting_wins_over_the_models_own(tmp_path: Path) -> None:
    model = folder(tmp_path, QWEN3, "qwen3")
    inline = read_model_files(model, CHATML)
    assert (inline.template, inline.template_from) == (CHATML, "CHAT_TEMPLATE")
    assert choose(inline, "auto", "auto", TOOL_NAMES, REASONING_NAMES).tool_parser is None
    assert read_model_files(model).template_from == "tokenizer_config.json"


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path: Path) -> None:
    model = folder(tmp_path, CHATML, "mistral")
    (model / "chat_template.jinja").write_text(MISTRAL)
    files = read_model_files(model)
    assert (files.template, files.template_from, files.model_type) == (
        MISTRAL,
        "chat_template.jinja",
        "mistral",
    )


def test_unreadable_files_count_as_absent(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text('["a list"]')
    assert read_model_files(tmp_path) == ModelFiles()
    assert read_model_files(None) == ModelFiles()
    assert read_model_files(tmp_path / "missing") == ModelFiles()


def test_only_registered_parsers_are_chosen(tmp_path: Path) -> None:
    files = read_model_files(folder(tmp_path, QWEN3, "qwen3"))
    chosen = choose(files, "auto", "auto", TOOL_NAMES - {"hermes"}, {"deepseek_r1"})
    # the config's family maps to hermes too: nothing else fits a <tool_call> template
    assert chosen.tool_parser is None
    assert chosen.reasoning_parser == "deepseek_r1"


def test_an_explicit_setting_wins_over_detection(tmp_path: Path) -> None:
    files = read_model_files(folder(tmp_path, QWEN3, "qwen3"))
    chosen = choose(files, "pythonic", "deepseek_r1", TOOL_NAMES, REASONING_NAMES)
    assert chosen == Parsers(
        "pythonic", "set by TOOL_CALL_PARSER", "deepseek_r1", "set by REASONING_PARSER"
    )
    # on a model where detection finds nothing, too
    plain = read_model_files(folder(tmp_path, CHATML, "llama"))
    assert choose(plain, "hermes", "auto", TOOL_NAMES, REASONING_NAMES).tool_parser == "hermes"


def test_none_turns_detection_off(tmp_path: Path) -> None:
    files = read_model_files(folder(tmp_path, QWEN3, "qwen3"))
    assert choose(files, "none", "NONE", TOOL_NAMES, REASONING_NAMES) == Parsers(
        None, "TOOL_CALL_PARSER=none", None, "REASONING_PARSER=none"
    )


@pytest.mark.parametrize(
    ("tool", "reasoning", "variable"),
    [("hermes2", "auto", "TOOL_CALL_PARSER"), ("auto", "deepseek", "REASONING_PARSER")],
)
def test_an_unknown_name_is_refused_naming_the_variable(
    tool: str, reasoning: str, variable: str
) -> None:
    with pytest.raises(SettingsError, match=rf"^{variable}='\w+': not a parser this vLLM has; "):
        choose(ModelFiles(), tool, reasoning, TOOL_NAMES, REASONING_NAMES)


def test_flags() -> None:
    found = Parsers("hermes", "template", "qwen3", "template")
    nothing = Parsers(None, "the model has no chat template", None, "none")
    assert flags(found, None) == [
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
        "--reasoning-parser",
        "qwen3",
    ]
    # ENABLE_AUTO_TOOL_CHOICE=false keeps the parser (named and required calls) without auto
    assert flags(found, False) == ["--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]
    assert flags(nothing, None) == flags(nothing, False) == []
    with pytest.raises(SettingsError, match="^ENABLE_AUTO_TOOL_CHOICE=true needs a tool parser"):
        flags(nothing, True)


def test_describe_names_parser_and_signal() -> None:
    assert Parsers("hermes", "template: <tool_call>", None, "no thinking").describe() == (
        "tool parser hermes (template: <tool_call>); no reasoning parser (no thinking)"
    )
    assert Parsers(None, "no chat template", None, "no chat template").describe() == (
        "no tool parser (no chat template; tools then need TOOL_CALL_PARSER); "
        "no reasoning parser (no chat template)"
    )


def test_settings_default_to_auto() -> None:
    settings = load_settings({})
    assert (settings.tool_call_parser, settings.reasoning_parser) == ("auto", "auto")
    assert settings.enable_auto_tool_choice is None
    explicit = load_settings(
        {"TOOL_CALL_PARSER": "hermes", "REASONING_PARSER": "none", "ENABLE_AUTO_TOOL_CHOICE": "0"}
    )
    assert (explicit.tool_call_parser, explicit.reasoning_parser) == ("hermes", "none")
    assert explicit.enable_auto_tool_choice is False
    # settings of their own now, not passed to vLLM as flags
    assert explicit.engine_passthrough == {}
