"""The code's shape, checked: short functions, no import circles, stages that keep to their own internals.

These read the source as text (ast), so they run in milliseconds and fail with the place to fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "domaintune"
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"  # a function may pass the limit when a comment says why, on or above its def


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def long_functions(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        length = (node.end_lineno or node.lineno) - start + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        around = lines[max(0, start - 3) : node.body[0].lineno]
        if not any(LONG_MARK in line for line in around):
            found.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines_without_a_reason():
    offenders = [item for path in _modules().values() for item in long_functions(path)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines with no `{LONG_MARK} why` comment:\n" + "\n".join(
        offenders
    )


def _top_level_imports(path: Path, module: str, *, lazy: bool = False) -> set[str]:
    """Modules imported at import time (not under TYPE_CHECKING); with `lazy`, also those inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For)):
                visit(node.body)
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)

    visit(tree.body)
    return found


def _import_graph() -> dict[str, set[str]]:
    """Who imports whom, counting imports inside functions: a lazy import still makes a dependency."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _top_level_imports(path, name, lazy=True) if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_circles():
    # a package __init__ importing its own submodules is how packages export names, not a circle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_stages_do_not_import_the_project_config():
    """Stages receive their config; only the workflow, the CLI and the studio build a whole project config."""
    stages = ("data", "train", "eval", "export", "registry", "serve", "model", "hardware")
    offenders = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in stages:
            for dep in _top_level_imports(path, name):
                if dep == "domaintune.config" or dep.startswith("domaintune.config."):
                    offenders.append(f"{name} imports {dep}")
    assert not offenders, "\n".join(offenders)


def test_the_shape_checks_catch_what_they_claim(tmp_path):
    """The checkers themselves: a long function is caught unless it says why; a circle is found."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    bad = tmp_path / "bad.py"
    bad.write_text(f"def f():\n{body}\n", encoding="utf-8")
    assert len(long_functions(bad)) == 1
    bad.write_text(f"{LONG_MARK} one table of cases, clearer whole\ndef f():\n{body}\n", encoding="utf-8")
    assert long_functions(bad) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
