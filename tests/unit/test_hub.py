"""RunPod Hub files: the form's inputs are exactly the settings a deployment chooses, with the
settings' own defaults and descriptions, and the committed hub.json is what builder/runpod_hub.py
writes from the settings module (the docs page: tests/unit/test_settings_doc.py)."""

from __future__ import annotations

import json
from pathlib import Path

from builder.runpod_hub import render
from handler.settings import Settings, deployment_names, env_names, load_settings

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / ".runpod" / "hub.json"
TESTS = ROOT / ".runpod" / "tests.json"


def test_hub_inputs_are_the_deployment_settings() -> None:
    hub = json.loads(HUB.read_text())
    keys = [item["key"] for item in hub["config"]["env"]]
    assert sorted(keys) == sorted(deployment_names())
    assert set(env_names()) - set(keys) == {
        "RUNPOD_WEBHOOK_GET_JOB",
        "RUNPOD_REALTIME_PORT",
        "RUNPOD_MIN_MEMORY_GB",
    }


def test_hub_json_is_generated_from_the_settings() -> None:
    assert HUB.read_text() == render(), "run: python builder/runpod_hub.py"


def test_form_defaults_and_descriptions_are_the_settings() -> None:
    fields = {field.alias: field for field in Settings.model_fields.values() if field.alias}
    hub = json.loads(HUB.read_text())
    wrong = []
    for item in hub["config"]["env"]:
        field, form = fields[item["key"]], item["input"]
        default = field.get_default(call_default_factory=True)
        expected = None if default in (None, "") else default
        if form.get("default") != expected or form["description"] != field.description:
            wrong.append(item["key"])
    assert wrong == [], "run: python builder/runpod_hub.py"


def test_every_default_in_the_form_is_a_valid_setting() -> None:
    hub = json.loads(HUB.read_text())
    defaults = {
        item["key"]: str(item["input"]["default"]).lower()
        if isinstance(item["input"]["default"], bool)
        else str(item["input"]["default"])
        for item in hub["config"]["env"]
        if "default" in item["input"]
    }
    load_settings(defaults)  # raises, naming the variable, if one is not


def test_tests_json_runs_the_small_default_model() -> None:
    tests = json.loads(TESTS.read_text())
    env = {item["key"]: item["value"] for item in tests["config"]["env"]}
    assert env["MODEL_NAME"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(env) <= set(deployment_names())
    load_settings(env)
    assert [t["name"] for t in tests["tests"]] == ["openai_chat", "native_stream", "models"]
