"""The language-model benchmark regenerated at small scale, for real (slow: `python -m pytest -m slow`).

SmolLM2 runs at a few hundred tokens per second on CPU, too slow for a test, so ``benchmarks/results_lm.py``
runs end to end with ``--teacher``/``--data-dir`` on the tiny ONNX token teacher of ``tests/teachers.py``
(vocabulary 256) and on sequences *drawn from that teacher*: the teacher is then the true distribution of the
data, as a good pretrained LM is close to its text's, and distilling it should lower held-out perplexity
against cross-entropy on the same few thousand tokens. Checked: the direction (top-k KD below CE only on test
perplexity), that every row and the sampled arm exist, and that the BENCHMARKS.md section replaces only its
own markers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import teachers

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 256, 32


def sample_from_teacher(w: dict, n: int, seed: int) -> np.ndarray:
    """n sequences of LENGTH tokens drawn autoregressively from the teacher (``teachers.token_forward``'s model)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, LENGTH), dtype=np.int64)
    ids[:, 0] = rng.integers(0, VOCAB, n)
    running = np.zeros((n, w["emb"].shape[1]), dtype=np.float64)
    for t in range(LENGTH - 1):
        embed = w["emb"][ids[:, t]]
        running += embed
        logits = (embed + running / (t + 1)) @ w["head"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ids[:, t + 1] = [rng.choice(VOCAB, p=row) for row in p]
    return ids


@pytest.mark.slow
def test_lm_benchmark_topk_kd_beats_ce_small(tmp_path) -> None:
    weights = teachers.make_token_teacher(tmp_path / "teacher.onnx", vocab=VOCAB, dim=16, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    splits = {"train": (192, 1), "val": (48, 2), "test": (64, 3)}
    for split, (n, seed) in splits.items():
        teachers.write_sequences(data / f"{split}.parquet", list(sample_from_teacher(weights, n, seed)))
    teachers.write_sequences(data / "probe.parquet", list(sample_from_teacher(weights, 192, 1)[:16]))

    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    args = [
        sys.executable,
        "benchmarks/results_lm.py",
        "--teacher",
        str(tmp_path / "teacher.onnx"),
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--student",
        "causal-lm:layers=1,d_model=32,heads=2",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lrs",
        "3e-3",
        "--alphas",
        "0.5,1.0",
        "--seeds",
        "0",
        "--jobs",
        "2",
        "--samples-grid",
        "2,4,8,16,32,64",
        "--markdown",
        str(markdown),
    ]
    done = subprocess.run(args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((tmp_path / "out" / "results_lm.json").read_text())
    rows = result["rows"]
    assert set(rows) == {
        "CE only",
        "top-k k=8",
        "top-k k=32",
        "top-k k=64",
        f"sampled N={result['caches']['matched']['8']}",
    }
    ce, kd = rows["CE only"]["test_perplexity"][0], rows["top-k k=64"]["test_perplexity"][0]
    assert kd < ce, (kd, ce)
    assert rows["CE only"]["alpha"] == 0 and rows["top-k k=64"]["alpha"] > 0
    assert result["teacher"]["perplexity"] < kd, "the teacher is the data's own distribution"
    sampled = rows[f"sampled N={result['caches']['matched']['8']}"]
    assert 0 < sampled["bytes_per_position"] <= rows["top-k k=8"]["bytes_per_position"]

    text = markdown.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert text.count("<!-- lm:start -->") == 1 and text.count("<!-- lm:end -->") == 1
    assert "| top-k k=64 |" in text and "| CE only |" in text
