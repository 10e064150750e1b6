"""Bake a model into the image at build time: download it from the Hugging Face hub into BASE_PATH
and write ``BASE_PATH/model.json``, which the worker reads at cold start
(``handler/model_source.py``) to load the model offline.

In (environment, from the Dockerfile's build arguments): ``MODEL_NAME`` (a hub repository id;
empty: nothing is baked and the script exits 0), ``MODEL_REVISION`` (branch, tag or commit;
default ``main``), ``TOKENIZER_NAME`` (another repository for the tokenizer, optional),
``BASE_PATH`` (default ``/models``). A token for gated or private models is read from the build
secret file ``/run/secrets/hf_token`` (``docker build --secret id=hf_token,env=HF_TOKEN``) or
``HF_TOKEN``; it is passed to the download only and written nowhere.

Out: ``BASE_PATH/ORG--NAME/`` with the weights (safetensors only, when the repository has them) and
the tokenizer, and ``model.json``: ``{"model", "revision", "commit", "path", "tokenizer",
"tokenizer_path"}`` (paths relative to BASE_PATH). Errors: the hub's, as they are; the build fails.

Build-time only: never imported by the handler package.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

SECRET_FILE = Path("/run/secrets/hf_token")
# Never needed to serve with vLLM: other frameworks' weights and the original checkpoints.
SKIPPED = ["*.pth", "*.pt", "original/*", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot"]


def token(environ: dict[str, str], secret: Path = SECRET_FILE) -> str | None:
    if secret.is_file():
        value = secret.read_text().strip()
        if value:
            return value
    return environ.get("HF_TOKEN") or None


def folder_name(repo: str) -> str:
    return repo.replace("/", "--")


def skipped_patterns(files: list[str]) -> list[str]:
    """What not to download: other frameworks' weights, and ``*.bin`` when safetensors exist."""
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    return SKIPPED + (["*.bin"] if has_safetensors else [])


def manifest(
    model: str, revision: str, commit: str, tokenizer: str | None, tokenizer_dir: str | None
) -> dict[str, Any]:
    return {
        "model": model,
        "revision": revision,
        "commit": commit,
        "path": folder_name(model),
        "tokenizer": tokenizer,
        "tokenizer_path": tokenizer_dir,
    }


def download(repo: str, revision: str, target: Path, hf_token: str | None) -> str:
    """The repository at ``revision`` into ``target``; returns the commit it resolved to."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(repo, revision=revision, token=hf_token, files_metadata=False)
    files = [s.rfilename for s in info.siblings or []]
    snapshot_download(
        repo,
        revision=info.sha,
        local_dir=target,
        token=hf_token,
        ignore_patterns=skipped_patterns(files),
    )
    # the hub client's own bookkeeping is not needed to load the folder
    shutil.rmtree(target / ".cache", ignore_errors=True)
    return str(info.sha)


def main(environ: dict[str, str]) -> int:
    model = environ.get("MODEL_NAME", "").strip()
    if not model:
        print("download_model: no MODEL_NAME: nothing baked; the worker fetches it at cold start")
        return 0
    revision = environ.get("MODEL_REVISION", "").strip() or "main"
    tokenizer = environ.get("TOKENIZER_NAME", "").strip() or None
    base = Path(environ.get("BASE_PATH", "").strip() or "/models")
    hf_token = token(environ)
    base.mkdir(parents=True, exist_ok=True)
    commit = download(model, revision, base / folder_name(model), hf_token)
    tokenizer_dir = None
    if tokenizer and tokenizer != model:
        download(tokenizer, "main", base / folder_name(tokenizer), hf_token)
        tokenizer_dir = folder_name(tokenizer)
    record = manifest(model, revision, commit, tokenizer, tokenizer_dir)
    (base / "model.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"download_model: {model}@{revision} ({commit}) baked into {base / record['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(dict(os.environ)))
