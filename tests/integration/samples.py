"""Requests shared by the OpenAI-surface suites (SDK and native shape), and what SmolLM2 answers."""

from __future__ import annotations

from typing import Any

QUESTION: Any = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]
ANSWER = "The capital of France is Paris."
WEATHER: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": CITY_SCHEMA,
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a city.",
            "parameters": CITY_SCHEMA,
            "strict": True,
        },
    },
]
# The same tools without "strict": with strict tools vLLM constrains even `auto` calls itself
# (structural tags), which would override the regex below.
LOOSE_TOOLS: Any = [
    {"type": "function", "function": {k: v for k, v in t["function"].items() if k != "strict"}}
    for t in TOOLS
]
# What a Hermes-style model emits for a tool call; SmolLM2 is made to emit it with a regex.
HERMES_CALL = r'<tool_call>\n\{"name": "get_time", "arguments": \{"city": "Tokyo"\}\}\n</tool_call>'
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Ada", "Grace", "Linus"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {
            "type": "array",
            "items": {"type": "string", "enum": ["C", "Python", "Rust"]},
            "maxItems": 2,
        },
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
# vLLM's logprobs include the end-of-turn token that ended an answer
EOS = "<|im_end|>"
