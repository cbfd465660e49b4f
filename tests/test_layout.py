"""The package's shape: tasks sit on top of the library, and no task imports another.

Read from the source with `ast` (nothing is imported), so a lazy import inside a function counts
as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "visioncare"
TASKS = PACKAGE / "tasks"


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `visioncare...` module a file imports (``from a.b import c`` gives a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "visioncare"}


def _task_modules() -> set[str]:
    return {_module_name(p) for p in TASKS.glob("*.py") if p.name != "__init__.py"}


def test_every_task_has_a_run_function() -> None:
    expected = {"train", "evaluate", "predict", "export", "preprocess", "ablate"}
    assert {name.rsplit(".", 1)[1] for name in _task_modules()} == expected
    for path in TASKS.glob("*.py"):
        if path.name == "__init__.py":
            continue
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert "run" in names, f"{path.name} has no run(cfg)"


def test_library_never_imports_a_task() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if TASKS in path.parents:
            continue
        for name in _imports(path):
            if name == "visioncare.tasks" or name.startswith("visioncare.tasks."):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_no_task_imports_another_task() -> None:
    tasks = _task_modules()
    offenders = []
    for path in TASKS.glob("*.py"):
        own = _module_name(path)
        for name in _imports(path) & tasks - {own}:
            offenders.append(f"{own} imports {name}")
    assert not offenders, offenders


def test_entry_scripts_only_call_their_task() -> None:
    """`src/<script>.py` imports `visioncare.cli` and exactly one task, nothing else of ours."""
    scripts = {
        "train": "train",
        "eval": "evaluate",
        "predict": "predict",
        "export": "export",
        "preprocess": "preprocess",
        "ablate": "ablate",
    }
    for script, task in scripts.items():
        ours = _imports(ROOT / "src" / f"{script}.py")
        assert ours == {"visioncare.cli", "visioncare.tasks", f"visioncare.tasks.{task}"} | {
            f"visioncare.cli.{n}" for n in ("run_main", "run_task")
        }, (script, ours)
