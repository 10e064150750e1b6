"""Which vLLM tool-call and reasoning parsers a model needs, detected from the files it ships.

In: the model folder (its chat template, from ``chat_template.jinja`` or ``tokenizer_config.json``,
and ``config.json``'s ``model_type`` / ``architectures``), the chat template the deployment sets
instead (``CHAT_TEMPLATE``: a file or the template itself), the ``TOOL_CALL_PARSER`` /
``REASONING_PARSER`` settings (``auto``, ``none`` or a parser name) and the parser names the
installed vLLM registers. No vLLM import: :mod:`handler.engine` passes the names in.

Out: a frozen :class:`Parsers`: the tool parser and the reasoning parser (or None), each with the
signal it was chosen from, and :meth:`Parsers.describe`, the one cold-start log line.

Detection reads the template's own control tokens first (the format the model was trained to
write), then ``config.json``'s family. A capability gate keeps it honest: no tool parser unless the
template renders tools, no reasoning parser unless it has a thinking section; only registered
names are chosen. Errors: an explicit name vLLM does not register raises
:class:`~handler.settings.SettingsError` naming the variable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.settings import SettingsError

AUTO = "auto"
NONE = "none"
# Files a chat template may come from, in the order vLLM (transformers) prefers them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
# Every file detection reads (fetched alone for a model vLLM is about to download).
MODEL_FILES = ("config.json", *TEMPLATE_FILES)


@dataclass(frozen=True)
class ModelFiles:
    """What detection reads from a model: its chat template and config.json's family."""

    template: str | None = None
    template_from: str = "no chat template"
    model_type: str | None = None
    architectures: tuple[str, ...] = ()

    def has(self, *needles: str) -> bool:
        return self.template is not None and all(n in self.template for n in needles)

    def matches(self, pattern: str) -> bool:
        return self.template is not None and re.search(pattern, self.template) is not None

    @property
    def family(self) -> str:
        """config.json's model type (or architecture), lower case; '' when unknown."""
        return (self.model_type or (self.architectures[0] if self.architectures else "")).lower()


@dataclass(frozen=True)
class Parsers:
    """The chosen parsers and why: ``*_signal`` names the setting or the template/config marker."""

    tool_parser: str | None
    tool_signal: str
    reasoning_parser: str | None
    reasoning_signal: str

    def describe(self) -> str:
        tool = (
            f"tool parser {self.tool_parser} ({self.tool_signal})"
            if self.tool_parser
            else f"no tool parser ({self.tool_signal}; tools then need TOOL_CALL_PARSER)"
        )
        reasoning = (
            f"reasoning parser {self.reasoning_parser} ({self.reasoning_signal})"
            if self.reasoning_parser
            else f"no reasoning parser ({self.reasoning_signal})"
        )
        return f"{tool}; {reasoning}"


@dataclass(frozen=True)
class _Rule:
    parser: str
    signal: str
    applies: Callable[[ModelFiles], bool]


def _renders_tools(files: ModelFiles) -> bool:
    """The template lists the request's tools or renders an assistant's tool calls."""
    return files.matches(r"\{[{%][^}]*\btool(s|_calls)\b")


def _deepseek(files: ModelFiles) -> bool:
    return files.has("<｜tool▁calls▁begin｜>")


# Template markers, most specific first: a family's own control tokens, then the generic ones.
TOOL_RULES = (
    _Rule(
        "openai",
        "template: gpt-oss channels <|channel|> and <|call|>",
        lambda f: f.has("<|channel|>", "<|call|>"),
    ),
    _Rule("mistral", "template: [TOOL_CALLS]", lambda f: f.has("[TOOL_CALLS]")),
    _Rule(
        "deepseek_v32",
        "template: DeepSeek DSML function calls",
        lambda f: f.has("DSML｜function_calls"),
    ),
    _Rule(
        "deepseek_v3",
        "template: DeepSeek tool-call tokens with a ```json block",
        lambda f: _deepseek(f) and f.has("```json"),
    ),
    _Rule("deepseek_v31", "template: DeepSeek tool-call tokens", _deepseek),
    _Rule("llama3_json", "template: Llama 3 <|python_tag|>", lambda f: f.has("<|python_tag|>")),
    _Rule(
        "llama3_json", "template: Llama 3 ipython role", lambda f: f.has("ipython<|end_header_id|>")
    ),
    _Rule("gemma4", "template: Gemma 4 <|tool_call>", lambda f: f.has("<|tool_call>")),
    _Rule(
        "functiongemma",
        "template: FunctionGemma <start_function_call>",
        lambda f: f.has("<start_function_call>"),
    ),
    _Rule(
        "kimi_k2",
        "template: <|tool_calls_section_begin|>",
        lambda f: f.has("<|tool_calls_section_begin|>"),
    ),
    _Rule("granite", "template: Granite <|tool_call|>", lambda f: f.has("<|tool_call|>")),
    _Rule(
        "qwen3_coder",
        "template: <tool_call> with <function=...> (Qwen3-Coder XML)",
        lambda f: f.has("<tool_call>", "<function="),
    ),
    _Rule("hermes", "template: <tool_call> (Hermes JSON)", lambda f: f.has("<tool_call>")),
)
# config.json's family, for a template that renders tools without a known marker.
TOOL_FAMILIES = {
    "llama": "llama3_json",
    "mistral": "mistral",
    "qwen2": "hermes",
    "qwen3": "hermes",
    "qwen3_moe": "hermes",
    "deepseek_v3": "deepseek_v3",
    "gpt_oss": "openai",
}

# Thinking sections. A <think> block is told apart by its toggle and then by config.json.
REASONING_RULES = (
    _Rule(
        "openai_gptoss",
        "template: gpt-oss analysis channel <|channel|>",
        lambda f: f.has("<|channel|>"),
    ),
    _Rule("gemma4", "template: Gemma 4 <|channel>", lambda f: f.has("<|channel>")),
    _Rule("mistral", "template: [THINK]", lambda f: f.has("[THINK]")),
    _Rule(
        "qwen3",
        "template: <think> with enable_thinking",
        lambda f: f.has("enable_thinking") and _thinks(f),
    ),
    _Rule(
        "deepseek_v3",
        "template: DeepSeek <think> with a thinking toggle",
        lambda f: f.has("｜Assistant｜") and f.matches(r"\bthinking\b") and _thinks(f),
    ),
)
REASONING_FAMILIES = {
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3",
    "deepseek_v3": "deepseek_r1",
    "gpt_oss": "openai_gptoss",
}
# Any other <think> section: DeepSeek R1's parser (content after </think>; R1, QwQ, distills).
THINK_DEFAULT = "deepseek_r1"


def _thinks(files: ModelFiles) -> bool:
    return files.has("<think>") or files.has("</think>")


def read_model_files(folder: str | Path | None, chat_template: str | None = None) -> ModelFiles:
    """The template and family detection reads. ``chat_template`` (CHAT_TEMPLATE) wins over the
    folder's own; missing or unreadable files count as absent."""
    root = Path(folder) if folder else None
    config = _json(root / "config.json") if root else {}
    architectures = config.get("architectures") or ()
    base = ModelFiles(
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        architectures=tuple(str(a) for a in architectures if isinstance(a, str)),
    )
    if chat_template:
        path = Path(chat_template)
        text = _text(path) if len(chat_template) < 4096 and "\n" not in chat_template else None
        if text is not None:
            return _with(base, text, "CHAT_TEMPLATE file")
        return _with(base, chat_template, "CHAT_TEMPLATE")
    for name in TEMPLATE_FILES:
        found = _template_in(root / name) if root else None
        if found:
            return _with(base, found, name)
    return base


def _with(base: ModelFiles, template: str, source: str) -> ModelFiles:
    return ModelFiles(template, source, base.model_type, base.architectures)


def _template_in(path: Path) -> str | None:
    if path.suffix == ".jinja":
        return _text(path)
    value = _json(path).get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates ("default", "tool_use", ...): read them all
        texts = [t.get("template") for t in value if isinstance(t, dict)]
        return "\n".join(t for t in texts if isinstance(t, str)) or None
    return None


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _json(path: Path) -> dict[str, Any]:
    text = _text(path)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def choose(
    files: ModelFiles,
    tool_setting: str,
    reasoning_setting: str,
    tool_names: Collection[str],
    reasoning_names: Collection[str],
) -> Parsers:
    """The parsers to run: an explicit setting wins, ``none`` turns one off, ``auto`` detects."""
    tool, tool_why = _setting("TOOL_CALL_PARSER", tool_setting, tool_names)
    if tool_setting.strip().lower() == AUTO:
        tool, tool_why = detect_tool_parser(files, tool_names)
    reasoning, reasoning_why = _setting("REASONING_PARSER", reasoning_setting, reasoning_names)
    if reasoning_setting.strip().lower() == AUTO:
        reasoning, reasoning_why = detect_reasoning_parser(files, reasoning_names)
    return Parsers(tool, tool_why, reasoning, reasoning_why)


def _setting(variable: str, value: str, names: Collection[str]) -> tuple[str | None, str]:
    name = value.strip()
    if name.lower() in (AUTO, NONE):
        return None, f"{variable}={name.lower()}"
    if name not in names:
        raise SettingsError(
            f"{variable}={value!r}: not a parser this vLLM has; use auto, none or one of "
            + ", ".join(sorted(names))
        )
    return name, f"set by {variable}"


def detect_tool_parser(files: ModelFiles, names: Collection[str]) -> tuple[str | None, str]:
    """The tool parser the template's markers (then config.json) call for, and the signal."""
    if files.template is None:
        return None, "the model has no chat template"
    if not _renders_tools(files):
        return None, f"the chat template ({files.template_from}) does not render tools"
    found = _first(TOOL_RULES, files, names)
    if found is not None:
        return found
    by_family = TOOL_FAMILIES.get(files.family)
    if by_family in names:
        return by_family, f"config.json: model_type {files.family}"
    return None, f"no known tool-call format in the chat template ({files.template_from})"


def detect_reasoning_parser(files: ModelFiles, names: Collection[str]) -> tuple[str | None, str]:
    """The reasoning parser the template's thinking section (then config.json) calls for."""
    if files.template is None:
        return None, "the model has no chat template"
    found = _first(REASONING_RULES, files, names)
    if found is not None:
        return found
    if not _thinks(files):
        return None, f"no thinking section in the chat template ({files.template_from})"
    by_family = REASONING_FAMILIES.get(files.family)
    if by_family in names:
        return by_family, f"template: <think>; config.json: model_type {files.family}"
    if THINK_DEFAULT in names:
        return THINK_DEFAULT, "template: <think>"
    return None, "template: <think>, but no matching parser in this vLLM"


def _first(
    rules: Iterable[_Rule], files: ModelFiles, names: Collection[str]
) -> tuple[str, str] | None:
    for rule in rules:
        if rule.parser in names and rule.applies(files):
            return rule.parser, f"{rule.signal}, from {files.template_from}"
    return None


def flags(chosen: Parsers, auto_tool_choice: bool | None) -> list[str]:
    """``vllm serve`` flags for the choice. ``auto_tool_choice`` (ENABLE_AUTO_TOOL_CHOICE): unset
    means on when there is a tool parser."""
    argv: list[str] = []
    if chosen.tool_parser:
        argv += ["--tool-call-parser", chosen.tool_parser]
    if auto_tool_choice and not chosen.tool_parser:
        raise SettingsError(
            f"ENABLE_AUTO_TOOL_CHOICE=true needs a tool parser, and there is none "
            f"({chosen.tool_signal}): set TOOL_CALL_PARSER"
        )
    if auto_tool_choice or (auto_tool_choice is None and chosen.tool_parser):
        argv.append("--enable-auto-tool-choice")
    if chosen.reasoning_parser:
        argv += ["--reasoning-parser", chosen.reasoning_parser]
    return argv
