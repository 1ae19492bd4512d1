"""The README's main job on the bundled default, run for real (slow: `python -m pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_job_kd_beats_scratch(tmp_path) -> None:
    env = os.environ | {"KD_CACHE_DIR": str(tmp_path / "cache"), "KD_RUNS_DIR": str(tmp_path / "runs")}
    done = subprocess.run(
        ["bash", str(ROOT / "data" / "run_default.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scratch = json.loads((tmp_path / "runs/default/scratch/metrics.json").read_text())
    kd = json.loads((tmp_path / "runs/default/kd/metrics.json").read_text())
    assert kd["test_accuracy"] > scratch["test_accuracy"], (kd["test_accuracy"], scratch["test_accuracy"])
    assert "scratch" in done.stdout and "kd" in done.stdout
    again = subprocess.run(
        ["bash", str(ROOT / "data" / "run_default.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0 and again.stderr.count("cache hit") == 2, "the second run must reuse both caches"
