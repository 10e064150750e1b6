"""Where the model comes from: a folder, the image's baked model, RunPod's cache, or a download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handler.model_source import ModelSource, apply, cached_snapshot, find
from handler.settings import Settings, load_settings


def settings_for(tmp_path: Path, **env: str) -> Settings:
    base = {"BASE_PATH": str(tmp_path / "models"), "RUNPOD_MODEL_CACHE": str(tmp_path / "hub")}
    return load_settings({**base, **env})


def bake(tmp_path: Path, **manifest: str) -> Path:
    folder = tmp_path / "models"
    (folder / "org--llm").mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"path": "org--llm", **manifest}))
    return folder / "org--llm"


def cache_entry(tmp_path: Path, repo: str, commit: str, refs: dict[str, str]) -> Path:
    entry = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (entry / "refs").mkdir()
    for name, target in refs.items():
        (entry / "refs" / name).write_text(target + "\n")
    return snapshot


def test_a_folder_loads_as_it_is(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, MODEL_NAME=str(tmp_path))
    assert find(settings) == ModelSource("folder", str(tmp_path), None, offline=True)


def test_the_baked_model_when_it_is_the_one_asked_for(tmp_path: Path) -> None:
    folder = bake(tmp_path, model="org/llm", revision="main", commit="abc123")
    for revision in ("", "main", "abc123"):
        settings = settings_for(tmp_path, MODEL_NAME="org/llm", MODEL_REVISION=revision)
        assert find(settings) == ModelSource("baked", str(folder), None, offline=True)
    for env in ({"MODEL_NAME": "org/other"}, {"MODEL_NAME": "org/llm", "MODEL_REVISION": "v2"}):
        assert find(settings_for(tmp_path, **env)).kind == "download"


def test_a_broken_manifest_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.json").write_text("{not json")
    assert find(settings_for(tmp_path, MODEL_NAME="org/llm")).kind == "download"


def test_runpods_cache_by_branch_or_commit(tmp_path: Path) -> None:
    snapshot = cache_entry(tmp_path, "org/llm", "c0ffee", {"main": "c0ffee"})
    assert find(settings_for(tmp_path, MODEL_NAME="org/llm")) == ModelSource(
        "runpod-cache", str(snapshot), None, offline=True
    )
    assert cached_snapshot(tmp_path / "hub", "org/llm", "c0ffee") == snapshot
    assert cached_snapshot(tmp_path / "hub", "org/llm", "v2") is None
    assert cached_snapshot(tmp_path / "hub", "llm", None) is None


def test_a_cached_model_with_an_uncached_tokenizer_goes_online(tmp_path: Path) -> None:
    snapshot = cache_entry(tmp_path, "org/llm", "c0ffee", {"main": "c0ffee"})
    settings = settings_for(tmp_path, MODEL_NAME="org/llm", TOKENIZER_NAME="org/tok")
    assert find(settings) == ModelSource("runpod-cache", str(snapshot), "org/tok", offline=False)
    tokenizer = cache_entry(tmp_path, "org/tok", "beef", {"main": "beef"})
    assert find(settings) == ModelSource(
        "runpod-cache", str(snapshot), str(tokenizer), offline=True
    )


def test_apply_keeps_the_served_name(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, MODEL_NAME="org/llm", MODEL_REVISION="main")
    loaded = apply(settings, ModelSource("baked", "/models/org--llm", None, offline=True))
    assert (loaded.model, loaded.model_id, loaded.model_revision, loaded.hugging_face_id) == (
        "/models/org--llm",
        "org/llm",
        None,
        "org/llm",
    )
    assert apply(settings, ModelSource("download", "org/llm")) is settings


@pytest.mark.parametrize("served", ["", "my-name"])
def test_apply_keeps_an_override(tmp_path: Path, served: str) -> None:
    settings = settings_for(
        tmp_path, MODEL_NAME="org/llm", OPENAI_SERVED_MODEL_NAME_OVERRIDE=served
    )
    loaded = apply(settings, ModelSource("runpod-cache", "/snap", offline=True))
    assert loaded.model_id == (served or "org/llm")
