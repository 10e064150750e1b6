"""The house's rules, read from every module's imports (top-level and lazy ones inside functions):

* the worker package (``handler``, what the image runs) imports nothing from the local endpoint,
  the benchmarks, the tests or the build scripts; only its engine package imports vllm;
* ``tests`` and ``bench`` both drive the local endpoint through ``local_endpoint`` and neither
  imports the other;
* no import circle anywhere, and inside ``handler`` and ``local_endpoint`` no module imports one
  that stands above it in :data:`LAYERS` (a new module has to be placed there to pass).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("handler", "local_endpoint", "bench", "builder", "tests")

# Bottom to top: a module may import modules of lower layers only.
LAYERS: dict[str, list[list[str]]] = {
    "handler": [
        [
            "handler",
            "handler.engine",
            "handler.errors",
            "handler.openrouter",
            "handler.compile_cache",
            "handler.engine.interface",
            "handler.engine.processes",
            "handler.media",
        ],
        ["handler.settings"],
        [
            "handler.guided",
            "handler.streaming",
            "handler.lmcache",
            "handler.parsers",
            "handler.model_card",
            "handler.job_loop",
            "handler.adapters",
        ],
        [
            "handler.protocol",
            "handler.v2_shape",
            "handler.model_source",
            "handler.metrics",
            "handler.engine.args",
            "handler.engine.asgi",
            "handler.engine.media_connector",
            "handler.engine.lora",
            "handler.engine.lmcache_connector",
        ],
        ["handler.engine.vllm_engine", "handler.jobs"],
        ["handler.cold_start"],  # the steps both entry points share
        ["handler.run_local"],  # `make run`: one job from test_input.json
        ["handler.worker"],  # the image's entry point
        ["handler.__main__"],
    ],
    "local_endpoint": [
        ["local_endpoint", "local_endpoint.jobstore", "local_endpoint.shm"],
        [
            "local_endpoint.options",
            "local_endpoint.metrics",
            "local_endpoint.relay",
            "local_endpoint.bodies",
            "local_endpoint.auth",
            "local_endpoint.workers",
        ],
        ["local_endpoint.client_routes"],
        ["local_endpoint.worker_routes"],
        ["local_endpoint.app"],
        ["local_endpoint.__main__"],
        ["local_endpoint.harness"],  # how tests and benchmarks start it and talk to it
    ],
}

# What each top-level package may import of the others.
ALLOWED = {
    "handler": set(),
    "local_endpoint": {"handler"},
    "builder": {"handler"},
    "bench": {"handler", "local_endpoint"},
    "tests": {"handler", "local_endpoint", "builder"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "trace" not in path.relative_to(ROOT).parts  # bench/trace: a sitecustomize, not code
    }


def imported(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Every module ``path`` imports (at any depth of its code), with the line: for ``from a
    import b``, ``a.b`` where that is a module of the project, else ``a``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in modules else node.module), node.lineno


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {target for target, _ in imported(path, modules) if target in modules}
        for name, path in modules.items()
    }


def test_every_module_of_the_worker_and_the_local_endpoint_has_a_layer() -> None:
    modules = project_modules()
    for package, layers in LAYERS.items():
        placed = [name for layer in layers for name in layer]
        present = sorted(name for name in modules if name.split(".")[0] == package)
        assert sorted(placed) == present, f"place each module of {package} in LAYERS"


def test_no_module_imports_one_that_stands_above_it() -> None:
    edges = graph()
    upward = []
    for layers in LAYERS.values():
        rank = {name: level for level, layer in enumerate(layers) for name in layer}
        for name, level in rank.items():
            upward += [
                f"{name} imports {target}"
                for target in sorted(edges[name])
                if target in rank and rank[target] >= level
            ]
    assert upward == []


def test_no_import_circle() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_packages_import_only_what_stands_below_them() -> None:
    modules = project_modules()
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in modules.items()
        for target, line in imported(path, modules)
        if (top := target.split(".")[0]) in ALLOWED
        and top != name.split(".")[0]
        and top not in ALLOWED[name.split(".")[0]]
    ]
    assert wrong == []


def test_only_the_engine_package_imports_vllm() -> None:
    modules = project_modules()
    importers = sorted(
        f"{path.relative_to(ROOT)}:{line}"
        for name, path in modules.items()
        if name.split(".")[0] in ("handler", "local_endpoint")
        and not name.startswith("handler.engine.")
        for target, line in imported(path, modules)
        if target.split(".")[0] == "vllm"
    )
    assert importers == []
    engine = {
        name
        for name, path in modules.items()
        if name.startswith("handler.engine.")
        and any(target.split(".")[0] == "vllm" for target, _ in imported(path, modules))
    }
    # the arguments, the engine and its app, and the media connector vLLM's app loads images with
    assert engine == {
        "handler.engine.args",
        "handler.engine.vllm_engine",
        "handler.engine.media_connector",
        "handler.engine.lora",  # vLLM's LoRA resolver registry, LoRA requests, adapter rules
    }
