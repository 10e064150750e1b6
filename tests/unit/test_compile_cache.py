"""Where vLLM's compile cache goes (handler.compile_cache), on real folders: a mounted and
writable volume, an absent one, a read-only one (a read-only bind mount, as a read-only volume
is), a nearly full one, the setting blank, VLLM_CACHE_ROOT set, and two starts at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from handler.compile_cache import SAFE_FORMAT, CacheFolder, choose
from handler.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
STAYS = "vLLM's compile cache stays in the container (compiled at each start)"


def test_a_mounted_writable_volume_holds_the_cache(tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    folder = volume / "vllm-cache"
    assert choose(str(folder)) == CacheFolder(
        str(folder),
        True,
        f"vLLM's compile cache in {folder}, shared with the endpoint's other workers",
        environment={"VLLM_CACHE_ROOT": str(folder), **SAFE_FORMAT},
    )
    assert folder.is_dir() and list(folder.iterdir()) == []  # the write probe is gone


def test_an_existing_cache_folder_is_kept_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "vllm-cache"
    (folder / "torch_compile_cache").mkdir(parents=True)
    (folder / "torch_compile_cache" / "artifact").write_bytes(b"compiled")
    assert choose(str(folder)).root == str(folder)
    assert (folder / "torch_compile_cache" / "artifact").read_bytes() == b"compiled"
    assert sorted(p.name for p in folder.iterdir()) == ["torch_compile_cache"]


def test_no_volume_mounted_leaves_the_cache_in_the_container(tmp_path: Path) -> None:
    folder = tmp_path / "runpod-volume" / "vllm-cache"
    assert choose(str(folder)) == CacheFolder(
        None, False, f"{folder.parent} is not mounted: {STAYS}"
    )
    assert not folder.parent.exists()  # nothing created in place of the volume


def test_blank_turns_it_off(tmp_path: Path) -> None:
    assert choose("") == CacheFolder(None, False, f"COMPILE_CACHE_DIR is blank: {STAYS}")
    assert choose("  ") == choose("")
    assert choose(None) == choose("")


def test_settings_default_blank_and_explicit(tmp_path: Path) -> None:
    assert load_settings({}).compile_cache_dir == "/runpod-volume/vllm-cache"
    assert load_settings({"COMPILE_CACHE_DIR": ""}).compile_cache_dir == ""
    assert load_settings({"COMPILE_CACHE_DIR": " "}).compile_cache_dir == ""
    mine = load_settings({"COMPILE_CACHE_DIR": str(tmp_path), "VLLM_CACHE_ROOT": "/cache"})
    assert (mine.compile_cache_dir, mine.vllm_cache_root) == (str(tmp_path), "/cache")
    assert "VLLM_CACHE_ROOT" not in mine.engine_passthrough


def test_an_explicit_vllm_cache_root_wins(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    chosen = choose(str(volume / "vllm-cache"), vllm_cache_root="/my/cache")
    assert chosen == CacheFolder(
        None, False, "VLLM_CACHE_ROOT=/my/cache is set: vLLM's cache stays there"
    )
    assert list(volume.iterdir()) == []  # the volume was not touched


def test_a_nearly_full_volume_is_not_used(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    chosen = choose(str(tmp_path / "vllm-cache"), min_free_bytes=free + (1 << 40))
    assert (chosen.root, chosen.problem) == (None, True)
    assert chosen.reason.startswith(f"{tmp_path / 'vllm-cache'} is nearly full (")
    assert chosen.reason.endswith(f" MiB free): {STAYS}")


def test_a_path_that_cannot_be_a_folder_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "vllm-cache").write_text("a file, not a folder")
    chosen = choose(str(tmp_path / "vllm-cache"))
    assert (chosen.root, chosen.problem) == (None, True)
    assert chosen.reason == f"{tmp_path / 'vllm-cache'} is not writable (File exists): {STAYS}"


READ_ONLY_SCRIPT = """
import json, subprocess, sys
volume, folder = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "--bind", volume, volume], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", volume, volume], check=True)
from handler.compile_cache import choose
for path in (folder, volume + "/new-cache"):
    chosen = choose(path)
    print(json.dumps([chosen.root, chosen.problem, chosen.reason]))
"""


def test_a_read_only_volume_is_not_used(tmp_path: Path) -> None:
    """The volume is a real read-only mount (a bind mount in a user and mount namespace of its
    own), where even root cannot write: an existing cache folder and a new one."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("no user namespaces here to mount a read-only volume in")
    volume = tmp_path / "volume"
    (volume / "vllm-cache").mkdir(parents=True)
    result = subprocess.run(
        [
            "unshare",
            "-rm",
            sys.executable,
            "-c",
            READ_ONLY_SCRIPT,
            str(volume),
            str(volume / "vllm-cache"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    existing, new = (json.loads(line) for line in result.stdout.splitlines())
    problem = "not writable (Read-only file system)"
    assert existing == [None, True, f"{volume / 'vllm-cache'} is {problem}: {STAYS}"]
    assert new == [None, True, f"{volume / 'new-cache'} is {problem}: {STAYS}"]
    assert list((volume / "vllm-cache").iterdir()) == []


def _choose_after(start: float, folder: str) -> tuple[str | None, int]:
    time.sleep(max(0.0, start - time.time()))
    return choose(folder).root, os.getpid()


def test_two_starts_at_once_both_use_the_folder(tmp_path: Path) -> None:
    """Two processes decide at the same moment on a folder neither has created yet."""
    volume = tmp_path / "volume"
    volume.mkdir()
    folder = str(volume / "vllm-cache")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(3):
            shutil.rmtree(folder, ignore_errors=True)
            start = time.time() + 1.0
            results = list(pool.map(_choose_after, [start, start], [folder, folder]))
            assert [root for root, _ in results] == [folder, folder]
            assert len({pid for _, pid in results}) == 2
            assert os.listdir(folder) == []
