"""LoRA adapters by name, from a folder (``LORA_DIR``) or the Hugging Face Hub's listed
repositories: which names may be one, where its files are, whether they fit the served model, and
a private copy of them for the engine.

In: the folder (each subfolder an adapter, named as the folder is), the name a request gave as its
``model``, and the names the served model goes by (:func:`base_names`: its served name, its Hub
id, its path). Out: :func:`prepare` gives the adapter's checked private copy, which the engine
loads (and reloads after an eviction) whatever later happens in the folder; :func:`listing` the
folder's adapters for this model; :func:`hub_name` which repository of the list a name is in.

Errors, each saying why and naming no path: :class:`~handler.errors.NotFound` (404) for a name
that cannot be an adapter; :class:`~handler.errors.InvalidRequest` (400) for an adapter that does
not fit: a link out of the folder, no or unreadable ``adapter_config.json``, not LoRA, trained on
another model, no weights, or weights that are not a whole safetensors file.

Nothing outside the folder is read: a name is one folder name (letters, digits, ``.``, ``_``,
``-``; no ``/``, no ``..``), and the adapter's folder and each file are resolved (links followed)
and must lie inside the folder's own real path before anything is opened. The checks run on the
private copy, so what was checked is what the engine loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.errors import InvalidRequest, NotFound
from handler.settings import LORA_DIR_DEFAULT, SettingsError

CONFIG = "adapter_config.json"
# The weights files vLLM 0.32 reads, in the order it looks for them (lora/lora_model.py).
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "a folder name in LORA_DIR: letters, digits, '.', '_', '-', at most 128"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
# safetensors dtypes and their sizes in bytes
_DTYPE_BYTES = {
    **dict.fromkeys(["F64", "I64", "U64"], 8),
    **dict.fromkeys(["F32", "I32", "U32"], 4),
    **dict.fromkeys(["F16", "BF16", "I16", "U16"], 2),
    **dict.fromkeys(["F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "BOOL"], 1),
}


@dataclass(frozen=True)
class Folder:
    """The LORA_DIR decision: ``path`` (None: off) and one line for the log."""

    path: Path | None
    reason: str


def choose(configured: str) -> Folder:
    """The adapters' folder from ``LORA_DIR``: blank is off; the default is used when it exists;
    any other folder must exist (SettingsError)."""
    if not configured.strip():
        return Folder(None, "LORA_DIR is blank: no adapters from a folder")
    folder = Path(configured.strip())
    if folder.is_dir():
        return Folder(folder, f"LoRA adapters by name from {folder}, loaded on first use")
    if str(folder) == LORA_DIR_DEFAULT:
        return Folder(None, f"no {folder} (no network volume, or no loras folder on it)")
    raise SettingsError(f"LORA_DIR={configured!r}: not a folder")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an adapter in the folder, or None."""
    if NAME.fullmatch(name):
        return None
    return f"a LoRA adapter's name is {NAME_RULE} characters"


def normal(name: str) -> str:
    """A model name or path as compared: no surrounding blanks or trailing slash, any case."""
    return name.strip().rstrip("/").casefold()


def base_names(*names: str | None) -> frozenset[str]:
    """The names an adapter's ``base_model_name_or_path`` may give for the served model (its
    served name, its Hub id, the path it loads from), compared with :func:`normal`; a folder also
    by its real path."""
    found = set()
    for name in names:
        if name and name.strip():
            found.add(normal(name))
            if name.startswith(("/", ".")):
                found.add(normal(os.path.realpath(name)))
    return frozenset(found)


def hub_name(name: str, repos: tuple[str, ...]) -> tuple[str, str] | None:
    """``(repository, subfolder)`` for a name in one of the Hub repositories listed: the
    repository itself (subfolder ``.``) or a folder in it (``org/repo/sub/dir``); else None."""
    for repo in repos:
        if name == repo:
            return repo, "."
        if name.startswith(repo + "/"):
            parts = name[len(repo) + 1 :].split("/")
            if all(NAME.fullmatch(part) for part in parts):
                return repo, "/".join(parts)
    return None


def locate(root: Path, name: str) -> Path | None:
    """The real folder of adapter ``name`` in ``root``, or None when there is none. A name that
    is not one folder name is a NotFound; a link that leads out of the folder an InvalidRequest.
    Only names and links are resolved here: no file is opened."""
    problem = name_problem(name)
    if problem:
        raise NotFound(f"The model `{name[:200]}` does not exist: {problem}.", param="model")
    return _folder_in(root, name, name)


def _folder_in(root: Path, relative: str, label: str) -> Path | None:
    real_root = root.resolve()
    entry = real_root / relative
    if not os.path.lexists(entry):
        return None
    real = entry.resolve()
    if not real.is_relative_to(real_root):
        raise InvalidRequest(
            f"LoRA adapter `{label}` is a link that leads out of its folder: refused.",
            param="model",
        )
    return real if real.is_dir() else None


def adapter_files(folder: Path, root: Path, name: str) -> dict[str, Path]:
    """The files the engine reads, by their names in the adapter's folder (the config, then the
    first weights file vLLM looks for), each resolved to where its bytes are, which must be
    inside ``root`` (a link may lead elsewhere in it, as a Hugging Face cache's do)."""
    real_root = root.resolve()
    files = {}
    for wanted in (CONFIG, *WEIGHTS):
        entry = folder / wanted
        if not os.path.lexists(entry):
            continue
        real = entry.resolve()
        if not real.is_relative_to(real_root):
            raise InvalidRequest(
                f"LoRA adapter `{name}`: {wanted} is a link that leads out of its folder: refused.",
                param="model",
            )
        if real.is_file():
            files[wanted] = real
            if wanted != CONFIG:
                break
    if CONFIG not in files:
        raise InvalidRequest(f"LoRA adapter `{name}` has no {CONFIG}.", param="model")
    if len(files) < 2:
        raise InvalidRequest(
            f"LoRA adapter `{name}` has no weights ({', '.join(WEIGHTS)}).", param="model"
        )
    return files


def read_config(path: Path, name: str) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; an unreadable one is an InvalidRequest saying why."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InvalidRequest(
                f"LoRA adapter `{name}`: {CONFIG} is {size} bytes, more than "
                f"{MAX_CONFIG_BYTES} (not an adapter's config).",
                param="model",
            )
        config = json.loads(path.read_bytes())
    except ValueError as exc:
        where = (
            f" (line {exc.lineno} column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise InvalidRequest(
            f"LoRA adapter `{name}`: {CONFIG} is not valid JSON{where}.", param="model"
        ) from None
    except OSError as exc:
        raise InvalidRequest(
            f"LoRA adapter `{name}`: {CONFIG} cannot be read ({exc.strerror or 'error'}).",
            param="model",
        ) from None
    if not isinstance(config, dict):
        raise InvalidRequest(f"LoRA adapter `{name}`: {CONFIG} is not an object.", param="model")
    return config


def check_config(config: dict[str, Any], name: str, bases: frozenset[str], served: str) -> None:
    """A LoRA adapter (PEFT's ``peft_type: "LORA"``) trained on the served model, when its config
    names one (``base_model_name_or_path`` is one of ``bases``)."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise InvalidRequest(
            f'LoRA adapter `{name}`: {CONFIG} has no peft_type (PEFT writes "LORA").',
            param="model",
        )
    if peft_type != "LORA":
        raise InvalidRequest(
            f"LoRA adapter `{name}`: its peft_type is {str(peft_type)[:40]!r}; only LORA "
            "adapters load.",
            param="model",
        )
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base.strip() and normal(base) not in bases:
        raise InvalidRequest(
            f"LoRA adapter `{name}` was trained on {base[:200]!r}, not on the served model "
            f"{served!r} (its served name, Hub id or path).",
            param="model",
        )


def check_weights(path: Path, name: str) -> None:
    """A safetensors file must be whole: its header is JSON and its tensors' byte ranges tile
    the rest of the file exactly. A ``.bin``/``.pt`` file must not be empty."""
    size = path.stat().st_size
    if not path.name.endswith(".safetensors"):
        if size == 0:
            raise InvalidRequest(f"LoRA adapter `{name}`: {path.name} is empty.", param="model")
        return
    problem = safetensors_problem(path, size)
    if problem:
        raise InvalidRequest(
            f"LoRA adapter `{name}`: {path.name} is not a whole safetensors file ({problem}).",
            param="model",
        )


def safetensors_problem(path: Path, size: int) -> str | None:
    """What is wrong with a safetensors file's layout, or None."""
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return "shorter than its header's length"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            return "its header's length is past the end of the file"
        try:
            header = json.loads(file.read(length))
        except ValueError:
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return _layout_problem(tensors, size - 8 - length) if tensors else "it holds no tensor"


def _layout_problem(tensors: dict[str, Any], data_bytes: int) -> str | None:
    ranges = []
    for entry in tensors.values():
        try:
            start, end = entry["data_offsets"]
            shape, dtype = entry["shape"], entry["dtype"]
            count = 1
            for dim in shape:
                count *= int(dim)
        except (TypeError, KeyError, ValueError):
            return "a tensor's entry is malformed"
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            return "a tensor's byte range is malformed"
        if dtype in _DTYPE_BYTES and (end - start) != count * _DTYPE_BYTES[dtype]:
            return "a tensor's bytes do not match its shape"
        ranges.append((start, end))
    covered = 0
    for start, end in sorted(ranges):
        if start != covered:
            return "its tensors' byte ranges overlap or leave gaps"
        covered = end
    return None if covered == data_bytes else "its tensors' bytes do not fill the file"


@dataclass(frozen=True)
class Prepared:
    """An adapter checked in its private copy: where the copy is, its config, its size."""

    path: Path
    config: dict[str, Any]
    bytes: int


def prepare(
    root: Path, name: str, dest: Path, bases: frozenset[str], served: str
) -> Prepared | None:
    """Adapter ``name`` from the folder ``root``, copied into the new folder ``dest`` and checked
    there; None when the folder has no such adapter. A refused adapter leaves no copy."""
    folder = locate(root, name)
    return None if folder is None else copy_checked(folder, root, name, dest, bases, served)


def prepare_subfolder(
    snapshot: Path,
    subfolder: str,
    label: str,
    dest: Path,
    bases: frozenset[str],
    served: str,
    confine: Path,
) -> Prepared | None:
    """:func:`prepare` for a Hub repository: the adapter in ``subfolder`` of its ``snapshot``
    (``.``: the repository itself), called ``label``; its files may be links to anywhere in
    ``confine`` (the repository's cache folder, where a snapshot's links lead)."""
    folder = _folder_in(snapshot, subfolder, label)
    return None if folder is None else copy_checked(folder, confine, label, dest, bases, served)


def copy_checked(
    folder: Path, root: Path, name: str, dest: Path, bases: frozenset[str], served: str
) -> Prepared:
    """The adapter's files copied from ``folder`` into the new folder ``dest``, then checked
    there (so what was checked is what the engine reads)."""
    files = adapter_files(folder, root, name)
    dest.mkdir(parents=True)
    try:
        for wanted, real in files.items():
            shutil.copyfile(real, dest / wanted)
        config = read_config(dest / CONFIG, name)
        check_config(config, name, bases, served)
        weights = next(wanted for wanted in files if wanted != CONFIG)
        check_weights(dest / weights, name)
        copied = sum((dest / wanted).stat().st_size for wanted in files)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return Prepared(dest, config, copied)


def fingerprint(root: Path, name: str) -> tuple[tuple[str, int, int], ...]:
    """What an adapter's files are now (name, modification time, size of each, links followed),
    to tell whether a refused adapter has changed since; empty for none."""
    found = []
    for wanted in (CONFIG, *WEIGHTS):
        try:
            stat = (root / name / wanted).stat()
        except (OSError, ValueError):
            continue
        found.append((wanted, stat.st_mtime_ns, stat.st_size))
    return tuple(found)


def listing(
    root: Path,
    bases: frozenset[str],
    served: str,
    fits: Callable[[str, dict[str, Any]], None] = lambda name, config: None,
    limit: int = 1000,
) -> list[str]:
    """The names of the folder's adapters that fit the served model by their configs (``fits``
    raises InvalidRequest for one that does not; the weights are checked at first use), sorted;
    at most ``limit`` folders are looked at."""
    found = []
    try:
        entries = sorted(os.listdir(root))[:limit]
    except OSError:
        return []
    for name in entries:
        try:
            folder = locate(root, name)
            if folder is None:
                continue
            config = read_config(adapter_files(folder, root, name)[CONFIG], name)
            check_config(config, name, bases, served)
            fits(name, config)
        except (InvalidRequest, NotFound, OSError):
            continue
        found.append(name)
    return found
