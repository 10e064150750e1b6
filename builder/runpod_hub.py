"""Write ``.runpod/hub.json``, RunPod Hub's listing of this worker, from the settings module: one
environment input per setting a deployment chooses, with its description, type, default and
choices, so the Hub form and the worker never disagree (``tests/unit/test_hub.py`` checks the
committed file is what this writes).

    python builder/runpod_hub.py [OUT]   (default: .runpod/hub.json)

Repository tool: never imported by the handler package.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic.fields import FieldInfo

from handler.settings import Settings, deployment_names

ROOT = Path(__file__).resolve().parents[1]
# Shown first and not folded under "advanced" in the Hub's form.
MAIN_INPUTS = ("MODEL_NAME", "HF_TOKEN", "MAX_MODEL_LEN", "OPENAI_SERVED_MODEL_NAME_OVERRIDE")
PRESETS = [
    ("SmolLM2 135M Instruct (smoke test)", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen3 8B", "Qwen/Qwen3-8B"),
    ("Llama 3.1 8B Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
]


def input_type(field: FieldInfo) -> str:
    kinds = {arg for arg in typing.get_args(field.annotation) if arg is not type(None)}
    kinds = kinds or {field.annotation}
    if kinds <= {bool}:
        return "boolean"
    if kinds and kinds <= {int, float}:
        return "number"
    return "string"


def options(field: FieldInfo) -> list[dict[str, str]] | None:
    if typing.get_origin(field.annotation) is typing.Literal:
        return [{"label": str(v), "value": str(v)} for v in typing.get_args(field.annotation)]
    return None


def env_input(key: str, field: FieldInfo) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": key.replace("_", " ").title().replace("Lmcache", "LMCache").replace("Hf ", "HF "),
        "type": input_type(field),
        "description": field.description or "",
    }
    default = field.get_default(call_default_factory=True)
    if default is not None and default != "":
        spec["default"] = default
    choices = options(field)
    if choices:
        spec["options"] = choices
    if key not in MAIN_INPUTS:
        spec["advanced"] = True
    return {"key": key, "input": spec}


def hub_json() -> dict[str, Any]:
    fields = {field.alias: field for field in Settings.model_fields.values() if field.alias}
    order = [*MAIN_INPUTS, *(k for k in deployment_names() if k not in MAIN_INPUTS)]
    return {
        "title": "vLLM + LMCache",
        "description": "OpenAI-compatible LLM endpoint on vLLM, with LMCache keeping KV caches "
        "across requests, restarts and workers.",
        "type": "serverless",
        "category": "language",
        "config": {
            "runsOn": "GPU",
            "containerDiskInGb": 40,
            "gpuCount": 1,
            "allowedCudaVersions": ["13.0"],
            "presets": [
                {"name": name, "defaults": {"MODEL_NAME": model}} for name, model in PRESETS
            ],
            "env": [env_input(key, fields[key]) for key in order],
        },
    }


def render() -> str:
    return json.dumps(hub_json(), indent=2) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".runpod" / "hub.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")
