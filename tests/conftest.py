"""Shared fixtures: small real ONNX teachers and Parquet datasets written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import teachers


@pytest.fixture
def classifier_setup(tmp_path: Path) -> dict:
    """A 10-class classifier teacher with a 'hidden' tensor, and 300 labelled rows of 8 features."""
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    weights = teachers.make_classifier(tmp_path / "clf.onnx")
    data = teachers.write_vectors(tmp_path / "vec.parquet", x, np.arange(300) % 10)
    return {"teacher": tmp_path / "clf.onnx", "data": data, "x": x, "weights": weights, "cache_dir": tmp_path / "cache"}


@pytest.fixture
def token_setup(tmp_path: Path) -> dict:
    """A 50-token language-model-like teacher and 40 sequences of 2..12 tokens (padding happens in batches)."""
    seqs = teachers.random_sequences(40, 50)
    weights = teachers.make_token_teacher(tmp_path / "tok.onnx")
    data = teachers.write_sequences(tmp_path / "seq.parquet", seqs)
    return {
        "teacher": tmp_path / "tok.onnx",
        "data": data,
        "seqs": seqs,
        "weights": weights,
        "cache_dir": tmp_path / "cache",
    }
