"""docs/settings.md is what builder/settings_doc.py writes from the settings module now, so the
settings reference cannot drift from the code (the Hub form: tests/unit/test_hub.py)."""

from __future__ import annotations

import re

from builder.settings_doc import PAGE, main, render, settings_fields
from handler.settings import env_names


def test_settings_page_is_generated_from_the_settings() -> None:
    assert PAGE.read_text() == render(), "run: make docs"


def test_check_mode_accepts_the_committed_page() -> None:
    assert main(["--check"]) == 0


def test_settings_page_lists_every_setting_once() -> None:
    documented = re.findall(r"^\| `([A-Z0-9_]+)` \|", render(), flags=re.MULTILINE)
    assert sorted(documented) == sorted(env_names())


def test_every_setting_says_what_it_means() -> None:
    assert [k for k, f in settings_fields().items() if not (f.description or "").strip()] == []


def test_rows_show_defaults_and_choices() -> None:
    rows = {
        m[1]: (m[2], m[3])
        for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| (.*?) \| (.*) \|$", render(), re.MULTILINE)
    }
    assert rows["MAX_CONCURRENCY"][0] == "`32`"
    assert rows["LMCACHE_ENABLED"][0] == "`true`"
    assert rows["STREAM_FLUSH_INTERVAL_MS"][0] == "`50`"
    assert rows["MODEL_REVISION"][0] == "unset"
    assert rows["TENSOR_PARALLEL_SIZE"][0] == "vLLM's"
    assert rows["DTYPE"][1].endswith(
        "One of `auto`, `half`, `float16`, `bfloat16`, `float`, `float32`."
    )
    # setting names in a meaning are code, once
    assert "`GPU_MEMORY_UTILIZATION`" in rows["KV_CACHE_GB"][1]
    assert "``" not in render()
