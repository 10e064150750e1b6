"""The build-time model download's pure parts, and that the worker reads what it writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from builder.download_model import folder_name, main, manifest, skipped_patterns, token
from handler.model_source import ModelSource, find
from handler.settings import load_settings


def test_token_from_the_build_secret_first(tmp_path: Path) -> None:
    secret = tmp_path / "hf_token"
    assert token({"HF_TOKEN": "env"}, secret) == "env"
    secret.write_text("from-secret\n")
    assert token({"HF_TOKEN": "env"}, secret) == "from-secret"
    assert token({}, tmp_path / "none") is None


def test_bin_weights_are_skipped_only_beside_safetensors() -> None:
    assert "*.bin" in skipped_patterns(["config.json", "model.safetensors", "pytorch_model.bin"])
    assert "*.bin" not in skipped_patterns(["config.json", "pytorch_model.bin"])
    assert "original/*" in skipped_patterns([])


def test_no_model_name_bakes_nothing(tmp_path: Path) -> None:
    assert main({"MODEL_NAME": " ", "BASE_PATH": str(tmp_path)}) == 0
    assert list(tmp_path.iterdir()) == []


def test_the_worker_finds_what_the_builder_bakes(tmp_path: Path) -> None:
    record = manifest("org/llm", "main", "abc123", "org/tok", folder_name("org/tok"))
    assert record == {
        "model": "org/llm",
        "revision": "main",
        "commit": "abc123",
        "path": "org--llm",
        "tokenizer": "org/tok",
        "tokenizer_path": "org--tok",
    }
    (tmp_path / "model.json").write_text(json.dumps(record))
    settings = load_settings(
        {"MODEL_NAME": "org/llm", "TOKENIZER_NAME": "org/tok", "BASE_PATH": str(tmp_path)}
    )
    assert find(settings) == ModelSource(
        "baked", str(tmp_path / "org--llm"), str(tmp_path / "org--tok"), offline=True
    )


def test_the_handler_never_imports_builder() -> None:
    root = Path(__file__).resolve().parents[2] / "handler"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"^\s*(from|import) builder\b", path.read_text(), flags=re.MULTILINE)
    ]
    assert offenders == []
