"""The package layout is the architecture: dependencies point one way, light layers stay light,
and the public names the README lists resolve from their folders (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "icldistill"

# Lower numbers are lower layers; a module may import its own layer and the ones below it.
LAYERS = {
    "errors": 0, "config": 0, "_lazy": 0, "runtime": 1, "tasks": 2, "models": 2, "scoring": 3,
    "training": 4, "methods": 5, "experiments": 6, "report": 7, "cli": 8,
}


def _layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every icldistill import in a file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                pytest.fail(f"{path}:{node.lineno}: relative import; the package uses absolute imports")
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, m) for line, m in found if m == "icldistill" or m.startswith("icldistill.")]


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def test_every_module_sits_in_a_known_layer():
    for path in _modules():
        top = path.relative_to(SRC).parts[0].removesuffix(".py")
        assert top in LAYERS, f"{path}: {top!r} is in no layer of ARCHITECTURE.md"


def test_dependencies_point_down_only():
    upward = []
    for path in _modules():
        own = path.relative_to(SRC).parts[0].removesuffix(".py")
        for line, module in _imports(path):
            target = _layer_of(module)
            if target and LAYERS[target] > LAYERS[own]:
                upward.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_tasks_and_models_do_not_import_each_other():
    for path in _modules():
        own = path.relative_to(SRC).parts[0]
        for line, module in _imports(path):
            other = {"tasks": "models", "models": "tasks"}.get(own)
            assert not (other and _layer_of(module) == other), f"{path}:{line} imports {module}"


def test_light_layers_import_no_transformers():
    code = (
        "import sys\n"
        "import icldistill.tasks, icldistill.tasks.registry, icldistill.tasks.data, icldistill.tasks.prompts\n"
        "import icldistill.scoring.metrics, icldistill.training.losses, icldistill.training.contexts\n"
        "heavy = sorted(m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"light modules pulled in {out}"


@pytest.mark.parametrize("name", [
    "icldistill.methods.run_icl", "icldistill.methods.run_pbft", "icldistill.methods.run_distill",
    "icldistill.scoring.score_queries", "icldistill.training.fit", "icldistill.training.distillation_loss",
    "icldistill.models.load_model", "icldistill.experiments.collect", "icldistill.report.write_report",
    "icldistill.tasks.get_task", "icldistill.runtime.atomic_write_json",
])
def test_public_names_resolve_from_their_folder(name):
    import importlib

    package, attr = name.rsplit(".", 1)
    value = getattr(importlib.import_module(package), attr)
    assert callable(value) and value.__name__ == attr


def test_every_export_resolves():
    import importlib

    for init in sorted(SRC.glob("*/__init__.py")):
        package = importlib.import_module(f"icldistill.{init.parent.name}")
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = importlib.import_module("icldistill.scoring").nope


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circles():
    """No two modules import each other, directly or around a longer loop, at any level (function-level
    imports included): a circle means the two belong in one module or share a lower one (issue 19)."""
    graph = {_module_name(p): {m for _, m in _imports(p)} for p in _modules()}
    graph = {mod: {t for t in targets if t in graph and t != mod} for mod, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[str] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for target in sorted(graph[mod]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not circles, "import circles:\n" + "\n".join(circles)


MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines():
    """A function longer than a screen does several jobs; split it into named steps (issue 19). Counted from
    ``def`` to its last line, docstring included; nested functions count toward their parent too."""
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
