"""builder/import_closure.py on a tiny repository in a temporary folder: the walk from the
Dockerfile's entry points, and the check against a made-up pip report (no network)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from builder.import_closure import entries_from_dockerfile, main, third_party, walk

DOCKERFILE = """\
FROM python:3.12
WORKDIR /app
COPY app/ app/
COPY tools/bake.py tools/
RUN --mount=type=secret,id=token python tools/bake.py
RUN python -m compileall -q app
CMD ["python", "-m", "app"]
"""

FILES = {
    "Dockerfile": DOCKERFILE,
    "app/__init__.py": "",
    "app/__main__.py": "from app.core import run\n\nrun()\n",
    "app/core.py": (
        "import json\n"
        "from . import helpers\n"
        "\n"
        "def run():\n"
        "    import pytest\n"
        "    from app import lazy\n"
    ),
    "app/helpers.py": 'NAMES = ("app.threaded",)  # imported by name in a thread\n',
    "app/threaded.py": 'import importlib\n\nimportlib.import_module("yaml")\n',
    "app/lazy.py": "import typing\n\nif typing.TYPE_CHECKING:\n    import typeonly\n",
    "app/unreached.py": "import never\n",
    "tools/bake.py": "import sys\nimport runpod\n",
    "requirements-dev.txt": "pytest==1.0\n",
}
REPORT = {
    "install": [
        {"metadata": {"name": "runpod", "version": "1.10.0"}, "requested": True},
        {"metadata": {"name": "PyYAML", "version": "6.0.3"}, "requested": False},
    ]
}


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "report.json").write_text(json.dumps(REPORT))
    return root


def test_the_walk_follows_the_entry_points_through_lazy_and_named_imports(tmp_path: Path) -> None:
    root = make_tree(tmp_path, FILES)
    entries = entries_from_dockerfile(root / "Dockerfile", root)
    result = walk(entries)
    assert [(e.command, e.in_repository) for e in entries] == [
        ("python tools/bake.py", True),
        ("python -m compileall", False),
        ("python -m app", True),
    ]
    assert sorted(result.modules) == [
        "app",
        "app.__main__",
        "app.core",
        "app.helpers",
        "app.lazy",
        "app.threaded",
        "tools/bake.py",
    ]
    outside = sorted((i.name, str(i.file.relative_to(root)), i.line) for i in result.external)
    assert outside == [
        ("compileall", "Dockerfile", 6),
        ("importlib", "app/threaded.py", 1),
        ("json", "app/core.py", 1),
        ("pytest", "app/core.py", 5),
        ("runpod", "tools/bake.py", 2),
        ("sys", "tools/bake.py", 1),
        ("typing", "app/lazy.py", 1),
        ("yaml", "app/threaded.py", 3),
    ]
    assert list(third_party(result.external)) == ["pytest", "runpod", "yaml"]


def test_the_images_entry_points_are_read_from_the_dockerfile() -> None:
    root = Path(__file__).resolve().parents[2]
    commands = [e.command for e in entries_from_dockerfile(root / "Dockerfile", root)]
    assert {"python -m handler", "python builder/download_model.py"} <= set(commands)


def test_an_import_the_image_lacks_fails_with_its_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_tree(tmp_path, FILES)
    assert main(["--report", str(root / "report.json"), "--root", str(root)]) == 1
    out, err = capsys.readouterr()
    pytest_version = importlib.metadata.version("pytest")
    assert err.splitlines() == [
        "check-image: app/core.py:5 imports pytest, which requirements.txt does not provide for "
        f"the image; the development stack has it from pytest {pytest_version} "
        "(requirements-dev.txt)"
    ]
    assert "3 third-party modules, 1 NOT provided by requirements.txt" in out
    assert "only as dependencies of its pins: yaml (pyyaml 6.0.3)" in out


def test_a_module_the_dockerfile_does_not_copy_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = FILES | {"app/core.py": "from tools import extra\n", "tools/extra.py": ""}
    root = make_tree(tmp_path, files)
    assert main(["--report", str(root / "report.json"), "--root", str(root)]) == 1
    # tools/ itself is in the image (COPY tools/bake.py tools/): a namespace package there
    assert capsys.readouterr().err.splitlines() == [
        "check-image: app/core.py:1 imports tools.extra (tools/extra.py), which the Dockerfile "
        "does not copy into the image"
    ]


def test_everything_provided_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = FILES | {
        "app/core.py": "from . import helpers\n\ndef run():\n    from app import lazy\n"
    }
    root = make_tree(tmp_path, files)
    assert main(["--report", str(root / "report.json"), "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[-1] == (
        "check-image: the worker imports 2 third-party modules, all provided by requirements.txt: "
        "runpod, yaml; only as dependencies of its pins: yaml (pyyaml 6.0.3)"
    )
