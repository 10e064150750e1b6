"""Where the worker loads its model from, decided once at cold start.

In: the settings (``MODEL_NAME``, ``MODEL_REVISION``, ``TOKENIZER_NAME``, ``BASE_PATH``,
``RUNPOD_MODEL_CACHE``) and the file system. In order:

1. ``MODEL_NAME`` is a folder: loaded as it is.
2. A model baked into the image: ``BASE_PATH/model.json`` (written by ``builder/download_model.py``
   at build time) names the same repository, revision and tokenizer.
3. RunPod's model cache: ``RUNPOD_MODEL_CACHE/models--ORG--NAME/snapshots/COMMIT`` for the
   revision (a branch or tag through ``refs/``, or a commit), tokenizer included when it is another
   repository.
4. Otherwise vLLM downloads it from the Hugging Face hub at cold start (``HF_TOKEN`` for gated
   models), once per worker.

Out: a :class:`ModelSource`; :func:`apply` gives the settings that load it. Cases 1-3 load with the
hub offline and the served model name unchanged (clients still say ``MODEL_NAME``). Raises nothing:
an unreadable manifest or cache entry is logged and skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from handler.model_card import default_hub_id
from handler.settings import Settings

log = logging.getLogger("handler.model_source")
MANIFEST = "model.json"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["folder", "baked", "runpod-cache", "download"]
    model: str  # what vLLM loads: a folder, or the repository id to download
    tokenizer: str | None = None
    offline: bool = False


def find(settings: Settings) -> ModelSource:
    if Path(settings.model).is_dir():
        return ModelSource("folder", settings.model, settings.tokenizer, offline=True)
    baked = _baked(Path(settings.base_path) / MANIFEST, settings)
    if baked is not None:
        return baked
    cache = Path(settings.model_cache_path)
    snapshot = cached_snapshot(cache, settings.model, settings.model_revision)
    if snapshot is not None:
        tokenizer = settings.tokenizer
        if tokenizer is not None and not Path(tokenizer).is_dir():
            found = cached_snapshot(cache, tokenizer, None)
            if found is None:  # the model is cached, its tokenizer is not: fetch that
                return ModelSource("runpod-cache", str(snapshot), tokenizer, offline=False)
            tokenizer = str(found)
        return ModelSource("runpod-cache", str(snapshot), tokenizer, offline=True)
    return ModelSource("download", settings.model, settings.tokenizer, offline=False)


def apply(settings: Settings, source: ModelSource) -> Settings:
    """Settings that load ``source`` and still serve the model under its configured name."""
    if source.kind == "download":
        return settings
    return settings.model_copy(
        update={
            "model": source.model,
            "tokenizer": source.tokenizer,
            "model_revision": None,  # a folder has one revision
            "served_model_name": settings.model_id,
            "hugging_face_id": settings.hugging_face_id or default_hub_id(settings.model),
        }
    )


def _baked(manifest: Path, settings: Settings) -> ModelSource | None:
    baked = _read_json(manifest)
    if baked is None:
        return None
    wanted_revisions = {None, baked.get("revision"), baked.get("commit")}
    same = (
        baked.get("model") == settings.model
        and settings.model_revision in wanted_revisions
        and settings.tokenizer in {None, baked.get("tokenizer")}
    )
    if not same:
        log.info(
            "the image's baked model (%s) is not MODEL_NAME %s: not used",
            baked.get("model"),
            settings.model,
        )
        return None
    folder = manifest.parent / str(baked.get("path", ""))
    tokenizer = baked.get("tokenizer_path")
    return ModelSource(
        "baked",
        str(folder),
        str(manifest.parent / tokenizer) if tokenizer else None,
        offline=True,
    )


def cached_snapshot(cache: Path, repo: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo`` at ``revision`` (default ``main``) in a hub cache."""
    if repo.count("/") != 1:
        return None
    entry = cache / ("models--" + repo.replace("/", "--"))
    wanted = revision or "main"
    ref = entry / "refs" / wanted
    try:
        commit = ref.read_text().strip() if ref.is_file() else wanted
    except OSError as exc:
        log.warning("cannot read %s: %s", ref, exc)
        return None
    snapshot = entry / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return value if isinstance(value, dict) else None
