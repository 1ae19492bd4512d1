"""`pipeline report` on real small caches and runs: the plots exist and decode, and the page's numbers are right."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_teacher, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from tests import teachers

QUIET = {"progress": False, "log": lambda m: None}


def _cache(setup: dict, data: Path, top_k: int = 3, temperature: float = 2.0) -> Path:
    config = CacheTeacherConfig(
        teacher=str(setup["teacher"]),
        data=str(data),
        top_k=top_k,
        temperature=temperature,
        cache_dir=str(setup["cache_dir"]),
    )
    return cache_teacher.run(config, **QUIET).path


def _train(setup: dict, data: Path, out: Path, cache: Path | None, alpha: float, eval_data: bool = True) -> None:
    config = TrainStudentConfig(
        data=str(data),
        cache=[cache.name] if cache else [],
        alpha=alpha,
        out=str(out),
        epochs=2,
        export_onnx=False,
        cache_dir=str(setup["cache_dir"]),
        eval_data=str(data) if eval_data else "",
        eval_cache=cache.name if cache and eval_data else "",
    )
    train_student.run(config, **QUIET)


def _report(setup: dict, runs: Path, out: Path, *names: str):
    return CliRunner().invoke(
        main, ["report", *names, "--out", str(out), "--cache-dir", str(setup["cache_dir"]), "--runs-dir", str(runs)]
    )


def _decodes(path: Path) -> tuple[int, int]:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.std() > 0.01  # a real picture, not a blank canvas
    return image.shape[:2]


def test_report_plots_and_page(classifier_setup, tmp_path):
    s = classifier_setup
    cache = _cache(s, s["data"])
    runs = tmp_path / "runs"
    _train(s, s["data"], runs / "scratch", None, 0.0)
    _train(s, s["data"], runs / "kd", cache, 0.7)
    result = _report(s, runs, tmp_path / "report", "scratch", "kd")
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    assert result.output.strip().splitlines()[-1] == str(out / "report.md")
    page = (out / "report.md").read_text()
    for image in ("learning_curves.png", "final_metrics.png", "reliability.png", "tail_mass.png"):
        assert f"]({image})" in page
        _decodes(out / image)
    assert "| scratch | scratch (α=0)" in page and f"| kd | kd | `mlp` | 0.7 | 2 | 2 | {cache.name} |" in page

    # the teacher's reliability numbers, recomputed densely with numpy from the teacher's own forward pass
    z = teachers.classifier_forward(s["weights"], s["x"])[0].astype(np.float64) / 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, correct = p.max(1), (p.argmax(1) == np.arange(300) % 10).astype(float)
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins)
    )
    found = re.search(r"accuracy ([0-9.]+), ECE ([0-9.]+) over (\d+) labelled examples", page)
    assert found, page
    assert float(found[1]) == pytest.approx(correct.mean(), abs=1e-4)
    assert float(found[2]) == pytest.approx(ece, abs=1e-4)
    assert int(found[3]) == 300
    tail = re.search(r"tail mass.*: mean ([0-9.e-]+), max ([0-9.e-]+) over 300 positions", page, re.IGNORECASE)
    top3 = np.sort(p, 1)[:, -3:].sum(1)
    assert float(tail[1]) == pytest.approx((1 - top3).mean(), rel=1e-3) and float(tail[2]) == pytest.approx(
        (1 - top3).max(), rel=1e-3
    )


def test_report_without_labels_or_caches_explains_what_it_skipped(classifier_setup, tmp_path):
    s = classifier_setup
    unlabelled = teachers.write_vectors(tmp_path / "unlabelled.parquet", s["x"])
    cache = _cache(s, unlabelled, top_k=10)
    runs = tmp_path / "runs"
    _train(s, unlabelled, runs / "teacher-only", cache, 1.0, eval_data=False)  # alpha 1 needs no labels
    result = _report(s, runs, tmp_path / "a", "teacher-only")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "a" / "report.md").read_text()
    table = page[page.index("| run |") :].split("\n\n")[0].splitlines()  # no final metrics: 7 columns
    assert {line.count("|") for line in table} == {8}, table
    assert "Reliability diagram skipped" in page and "has no label column" in page
    assert not (tmp_path / "a" / "reliability.png").exists()
    assert "all 300 positions have tail mass 0" not in page  # said on the plot, not the page
    _decodes(tmp_path / "a" / "tail_mass.png")
    _decodes(tmp_path / "a" / "learning_curves.png")

    _train(s, s["data"], runs / "scratch", None, 0.0)
    scratch = _report(s, runs, tmp_path / "b", "scratch")
    assert scratch.exit_code == 0, scratch.output
    assert "no run given used a cache" in (tmp_path / "b" / "report.md").read_text()
    assert not (tmp_path / "b" / "tail_mass.png").exists()
