"""The package's imports point one way (down the folders' layers): a walk over every `import comp...` (at the top of a module or inside a
function: a deferred import is still an arrow) finds no circle."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def _graph() -> dict[str, set[str]]:
    """Module -> the comp modules it imports (a `from comp.x import name` that names a module counts as that module)."""
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in (ROOT / "comp").rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "comp":
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "comp"}
        graph[name] = {m for m in out if m in mods and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle_in_the_package() -> None:
    graph = _graph()
    assert {"comp.pipeline.config", "comp.pipeline.cv", "comp.methods.merge", "comp.methods.compose"} <= set(graph)
    assert "comp.methods.compose" in graph["comp.methods.merge"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]  # the walk finds one


# The folders from the bottom up: a module may import its own folder's modules and those of the folders below.
LAYERS = ("core", "data", "regions", "nets", "methods", "pipeline", "report", "bench", "cli")


def _layer(module: str) -> int:
    """The layer of comp.<folder>.<module> (the package's own __init__/__main__ sit on top)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_every_import_points_down_the_folders() -> None:
    graph = _graph()
    assert {m.split(".")[1] for m in graph if m.count(".") >= 2} == set(LAYERS), "every folder is a layer"
    up = [f"{m} -> {n}" for m, ns in sorted(graph.items()) for n in sorted(ns) if _layer(n) > _layer(m)]
    assert not up, "imports pointing up: " + "; ".join(up)
    assert _layer("comp.core.errors") < _layer("comp.pipeline.cv") < _layer("comp.cli")


def test_imports_sit_at_the_top_unless_deferred_on_purpose() -> None:
    """Outside the CLI (whose commands import their stage when run), a comp import inside a function says why."""
    unsaid = []
    for path in (ROOT / "comp").rglob("*.py"):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        text = path.read_text()
        lines = text.splitlines()
        for fn in ast.walk(ast.parse(text)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("comp") and "# deferred" not in lines[n.end_lineno - 1]:
                        unsaid.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    assert not unsaid, "comp imports inside functions without a '# deferred: why' comment: " + ", ".join(unsaid)


def test_the_cli_and_the_non_learned_path_start_without_torch() -> None:
    """`comp score`, `validate`, a baseline's CV, the suite and the report import neither torch nor optuna."""
    import subprocess
    import sys

    code = ("import sys, comp.cli, comp.pipeline.cv, comp.pipeline.suite, comp.report.html, comp.methods.baselines\n"
            "print(sorted(m for m in ('torch', 'optuna', 'lightgbm', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
