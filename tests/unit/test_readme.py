from __future__ import annotations

import re
from pathlib import Path

from handler.settings import env_names

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_lists_exactly_the_settings() -> None:
    text = README.read_text()
    table = text[text.index("| Variable | Default | Meaning |") :]
    table = table[: table.index("\n\n")]
    documented = re.findall(r"^\| `([A-Z0-9_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(documented) == sorted(env_names())
