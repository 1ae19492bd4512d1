"""The two layers of the design card: ``stages`` is the library, ``pipeline`` the user-facing layer on top."""

import ast
import subprocess
import sys
from pathlib import Path

STAGES = Path(__file__).resolve().parent.parent / "stages"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_under_stages_imports_pipeline():
    offenders = {
        str(p.relative_to(STAGES.parent)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "pipeline")
        for p in sorted(STAGES.rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_importing_every_stage_loads_no_pipeline_module():
    code = (
        "import importlib, pkgutil, sys, stages\n"
        "for m in pkgutil.walk_packages(stages.__path__, 'stages.'): importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k == 'pipeline' or k.startswith('pipeline.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=STAGES.parent)
    assert out.stdout.strip() == "[]"
