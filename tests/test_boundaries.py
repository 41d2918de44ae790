"""Module boundaries, read from the source: the library never imports the server, the engine's
modules import each other in one direction, and the evaluation tools that drive the engine
live in bench/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (TYPE_CHECKING blocks and functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_library_never_imports_the_server() -> None:
    offenders = {
        module_name(path): sorted(m for m in imported_modules(path) if m == "server" or m.startswith("server."))
        for path in sorted((ROOT / "logquant").rglob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


@pytest.mark.parametrize("package", ["logquant", "server"])
def test_no_import_cycles(package: str) -> None:
    """Not even through TYPE_CHECKING imports: each module's dependencies point one way."""
    paths = sorted((ROOT / package).rglob("*.py"))
    graph = {module_name(p): {m for m in imported_modules(p) if m.startswith(f"{package}.")} for p in paths}
    graph = {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(name) :] + [name])}")
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, stack + [name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_engine_evaluations_point_to_bench() -> None:
    from logquant.eval.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["ppl", "--engine"])  # the library cannot reach the engine by itself
    assert parse_args(["ppl"], through_engine=True).engine
    with pytest.raises(SystemExit):
        parse_args(["coverage"], through_engine=True)
    assert (ROOT / "bench" / "eval_engine.py").is_file() and not (ROOT / "logquant" / "eval" / "engine.py").exists()
