"""benchmarks/results_mnist1d.py: its BENCHMARKS.md section handling, and one row regenerated at small scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def results_module(monkeypatch):
    pytest.importorskip("mnist1d")  # the `data` extra: the transfer set comes from its generator
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its sibling mnist1d_teachers
    import results_mnist1d

    return results_mnist1d


@pytest.mark.slow
def test_kd_with_transfer_set_beats_scratch_at_small_scale(results_module, tmp_path) -> None:
    """Scratch vs KD + a 10k transfer set, one seed, few epochs: the transfer row must come out ahead on test."""
    markdown = tmp_path / "BENCHMARKS.md"
    results = results_module.main(
        [
            "--out-dir",
            str(tmp_path / "out"),
            "--markdown",
            str(markdown),
            "--rows",
            "scratch,kd-transfer",
            "--transfer",
            "10000",
            "--seeds",
            "0",
            "--max-epochs-labelled",
            "40",
            "--max-epochs-transfer",
            "25",
        ]
    )
    scratch = results["rows"]["scratch"]["test_accuracy"]["mean"]
    kd = results["rows"]["kd-transfer"]["test_accuracy"]["mean"]
    assert kd > scratch, f"KD + transfer set {kd:.3f} does not beat scratch {scratch:.3f}"

    # Selection never read the test split; the final runs did, once each.
    for row in results["rows"].values():
        assert all("--test-data" not in s["command"] for s in row["selection"])
        assert all("--test-data" in run["command"] for run in row["runs"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"]["kd-transfer"]["test_accuracy"]["mean"] == kd
    text = markdown.read_text()
    assert results_module.START in text and "KD + transfer set" in text and "scratch MLP" in text
