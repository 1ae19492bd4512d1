"""The README's two commands exist, and CI runs exactly the README's test command."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(marker: str) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    return lines[lines.index(marker) + 1]


def test_readme_has_main_job_and_test_commands() -> None:
    main_job = _command_after("# main job")
    tests = _command_after("# tests")
    assert "data/run_default.sh" in main_job and main_job.startswith("pip install")
    assert "pytest" in tests and tests.startswith("pip install")


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    extracted = subprocess.run(
        ["bash", "-c", "grep -m1 -A1 '^# tests$' README.md | tail -n1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == _command_after("# tests")
    assert "grep -m1 -A1 '^# tests$' README.md" in script
