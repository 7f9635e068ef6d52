"""The package's layering rules, read from its own import statements, so that breaking one fails here.

The import graph is built from the source with `ast` (every `import` and `from ... import`, at module
level or inside a function), over whatever modules the package has: nothing here lists our modules by
hand. The rules:

- the planner and the types it plans with do no input or output: they import nothing outside the
  standard library, and nothing from it that reads, writes, waits or tells the time;
- nothing on the daemon's path imports the demo package, and the daemon loads none of the demo's SQL;
- the metrics do not import data access;
- the package has no import cycles.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import reconciler
from reconciler import db

PACKAGE = "reconciler"
ROOT = Path(reconciler.__file__).resolve().parent
DEMO = f"{PACKAGE}.demo"
STORE = f"{PACKAGE}.store"

# Standard-library modules that read or write files, sockets or processes, wait, or read the clock.
INPUT_OUTPUT_STANDARD_MODULES = frozenset(
    {
        "asyncio",
        "email",
        "http",
        "io",
        "logging",
        "multiprocessing",
        "os",
        "pathlib",
        "select",
        "selectors",
        "shutil",
        "signal",
        "smtplib",
        "socket",
        "ssl",
        "subprocess",
        "sys",
        "tempfile",
        "threading",
        "time",
        "urllib",
    }
)


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Module:
    name: str
    path: Path
    # Modules of the package imported anywhere in the module, and only at import time (not in a function).
    imports: set[str] = field(default_factory=set)
    imports_at_load: set[str] = field(default_factory=set)
    # Top-level names of everything else imported.
    external: set[str] = field(default_factory=set)
    # The files of sql/queries it loads (`db.queries_in("...")`), and the statements it names (`_query("...")`).
    query_files: set[str] = field(default_factory=set)
    statements: set[str] = field(default_factory=set)


def _package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py")) if "sql" not in path.parts}


def _with_parents(name: str) -> set[str]:
    """Importing `a.b.c` runs `a/__init__`, `a/b/__init__` and `a/b/c`."""
    parts = name.split(".")
    return {".".join(parts[:index]) for index in range(1, len(parts) + 1)}


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return True
    return False


def _string_argument(node: ast.Call) -> str | None:
    if len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def _read(name: str, path: Path, known: set[str]) -> Module:
    module = Module(name, path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            assert node.module is not None
            # `from reconciler import db` imports the module reconciler.db; `from x import name` imports x.
            targets = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            argument = _string_argument(node)
            if called == "queries_in" and argument is not None:
                module.query_files.add(argument)
            elif called == "_query" and argument is not None:
                module.statements.add(argument)
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                assert target in known, f"{path}: imports {target}, which is not a module of the package"
                found = _with_parents(target) - {PACKAGE} or {PACKAGE}
                module.imports |= found
                if not _in_function(node, parents):
                    module.imports_at_load |= found
            else:
                module.external.add(target.split(".")[0])
    module.imports.discard(name)
    module.imports_at_load.discard(name)
    return module


def package_graph() -> dict[str, Module]:
    found = _package_modules()
    graph = {name: _read(name, path, set(found)) for name, path in found.items()}
    # A guard against a parser that silently finds nothing: the package is not that small.
    assert len(graph) > 20
    assert sum(len(module.imports) for module in graph.values()) > 40
    return graph


GRAPH = package_graph()


def closure(starts: Iterable[str], *, at_load_only: bool = False) -> set[str]:
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        module = GRAPH[name]
        stack.extend(module.imports_at_load if at_load_only else module.imports)
    return seen


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def daemon_path() -> set[str]:
    """Every module `reconciler run` can execute: what the command line loads for any command (the other
    commands' imports, in their functions, do not run), then the daemon (`service`) and everything those
    modules import, in functions too."""
    command_line = {f"{PACKAGE}.__main__", f"{PACKAGE}.cli"}
    loaded = closure(command_line, at_load_only=True)
    return command_line | closure([*(loaded - command_line), f"{PACKAGE}.service"])


def test_the_planner_and_its_types_do_no_input_or_output() -> None:
    core = closure([f"{PACKAGE}.planner", f"{PACKAGE}.plan", f"{PACKAGE}.snapshot"])
    problems = []
    for name in sorted(core):
        for external in sorted(GRAPH[name].external):
            if external not in sys.stdlib_module_names:
                problems.append(f"{name} imports {external}, which is not in the standard library")
            elif external in INPUT_OUTPUT_STANDARD_MODULES:
                problems.append(f"{name} imports {external}, which does input, output or time")
    assert problems == []
    # The walk did reach the planner's own imports (schedule, plan types, snapshot types).
    assert len(core) >= 4


def test_nothing_on_the_daemons_path_imports_the_demo() -> None:
    path = daemon_path()
    assert f"{PACKAGE}.reconcile" in path
    assert f"{PACKAGE}.executor" in path
    assert sorted(name for name in path if in_package(name, DEMO)) == []


def test_the_daemon_loads_none_of_the_demos_statements() -> None:
    daemon_files = {file for name in daemon_path() for file in GRAPH[name].query_files}
    demo_files = {file for name, module in GRAPH.items() if in_package(name, DEMO) for file in module.query_files}
    assert daemon_files
    assert demo_files
    assert daemon_files & demo_files == set()
    # Every file is someone's: a file nobody loads is dead SQL.
    loaded = {file for module in GRAPH.values() for file in module.query_files}
    assert loaded == {path.name for path in (db.sql_directory() / "queries").glob("*.sql")}


def test_every_statement_a_module_names_is_in_the_file_it_loads() -> None:
    # Each data-access module loads only its own file, so a name from another file would fail at run time.
    problems = []
    for name, module in sorted(GRAPH.items()):
        if not module.statements:
            continue
        if len(module.query_files) != 1:
            problems.append(f"{name} names statements but loads {sorted(module.query_files)}")
            continue
        (file,) = module.query_files
        missing = module.statements - set(db.queries_in(file))
        if missing:
            problems.append(f"{name}: {sorted(missing)} not in {file}")
    assert problems == []


def test_the_metrics_do_not_import_data_access() -> None:
    data_access = {name for name, module in GRAPH.items() if in_package(name, STORE) or "asyncpg" in module.external}
    assert f"{PACKAGE}.db" in data_access
    for metrics in (f"{PACKAGE}.metrics", f"{PACKAGE}.notify.metrics"):
        reached = closure([metrics])
        assert sorted(reached & data_access) == [], metrics


def test_the_package_has_no_import_cycles() -> None:
    cycles = [sorted(component) for component in strongly_connected_components() if len(component) > 1]
    assert cycles == []


def strongly_connected_components() -> list[set[str]]:
    """Tarjan's algorithm over every import, at load time or in a function."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(name: str) -> None:
        index[name] = lowest[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for imported in GRAPH[name].imports:
            if imported not in index:
                visit(imported)
                lowest[name] = min(lowest[name], lowest[imported])
            elif imported in on_stack:
                lowest[name] = min(lowest[name], index[imported])
        if lowest[name] == index[name]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == name:
                    break
            components.append(component)

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    return components
