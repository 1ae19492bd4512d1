"""The README's main job on the bundled default, run for real (slow: `python -m pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("scratch", "kd", "kd-transfer", "ensemble")


def _job(env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", str(ROOT / "data" / "run_default.sh"), *args], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_default_job_orders_the_students_and_reuses_every_cache(tmp_path) -> None:
    env = os.environ | {"KD_CACHE_DIR": str(tmp_path / "cache"), "KD_RUNS_DIR": str(tmp_path / "runs")}
    runs = tmp_path / "runs" / "default"
    first = _job(env)
    accuracy = {name: json.loads((runs / name / "metrics.json").read_text())["test_accuracy"] for name in STUDENTS}
    assert accuracy["kd-transfer"] > accuracy["kd"] > accuracy["scratch"], accuracy
    for name in STUDENTS:
        assert f"{accuracy[name]:.1%}" in first.stdout, (name, first.stdout)
    assert "this run: 0 cache hits" in first.stdout
    assert "Traceback" not in first.stderr and "epoch 1 " not in first.stdout  # per-epoch lines go to job.log
    report = runs / "report"
    assert {p.name for p in report.glob("*.png")} >= {"learning_curves.png", "final_metrics.png"}
    assert str(report / "report.md") in first.stdout

    manifests = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/manifest.json")}
    assert len(manifests) == 4, "two teachers, each over train + transfer and over test"
    second = _job(env, "--quiet")
    assert "4 cache hits, no teacher ran" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests, "a cache was rewritten"
    assert second.stderr == "", "--quiet prints the table only"
    assert second.stdout.lstrip().startswith("student"), second.stdout[:500]
