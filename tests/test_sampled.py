"""Sampled soft targets: the draws, their cache format, and the unbiased KD loss built on them."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings

from stages import cache_format as fmt
from stages import cache_teacher, targets, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.errors import ConfigError
from stages.losses import KDLoss, SampledKDLoss, SampledTargets, SoftTargets

QUIET = {"progress": False, "log": lambda m: None}


def test_hashed_uniforms_are_deterministic_uniform_and_keyed() -> None:
    keys = np.arange(2000, dtype=np.uint64)
    u = targets.hashed_uniforms(keys, 8, seed=3)
    assert u.shape == (2000, 8) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(u, targets.hashed_uniforms(keys, 8, seed=3))
    assert not np.array_equal(u, targets.hashed_uniforms(keys, 8, seed=4))
    assert np.array_equal(u[5:9], targets.hashed_uniforms(keys[5:9], 8, seed=3)), (
        "a key's draws do not depend on its batch"
    )
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.integers(1, 64), st.floats(0.3, 4.0), st.integers(0, 10_000))
def test_sample_counts_are_distinct_ids_with_counts_summing_to_draws(v, d, t, seed) -> None:
    logits = torch.randn(5, v, generator=torch.Generator().manual_seed(seed)) * 3
    u = torch.from_numpy(targets.hashed_uniforms(np.arange(5, dtype=np.uint64), d, seed))
    ids, counts = targets.sample_counts(logits, t, u)
    assert (counts.sum(-1) == d).all()
    for row_ids, row_counts in zip(ids, counts):
        drawn = row_ids[row_counts > 0]
        assert (drawn.diff() > 0).all(), "distinct and ascending"
        assert ((0 <= drawn) & (drawn < v)).all()
        assert (row_counts[len(drawn) :] == 0).all(), "distinct ids are left-aligned"


def test_sample_frequencies_match_the_teacher() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    d = 200_000
    ids, counts = targets.sample_counts(
        logits, 2.0, torch.from_numpy(targets.hashed_uniforms(np.array([7], np.uint64), d, 0))
    )
    freq = torch.zeros(5, dtype=torch.float64).scatter_add_(0, ids[0], counts[0].double()) / d
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 2.0, -1), atol=4e-3)


def test_sampled_loss_with_exact_weights_equals_dense_kd() -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g, requires_grad=True)
    ids = torch.arange(9).expand(6, 9)
    weights = torch.softmax(teacher / 2.0, -1)
    labels, mask = torch.full((6,), -100), torch.ones(6, dtype=torch.bool)
    sampled = SampledKDLoss(1.0, 2.0)(student, SampledTargets(ids, weights, 2.0, 9), labels, mask)
    ids_v, logp, logz = targets.topk_log_probs(teacher, 9, 2.0)
    dense = KDLoss(1.0, 2.0)(student, SoftTargets(ids_v, logp, logz, 2.0, 9), labels, mask)
    assert torch.allclose(sampled.total, dense.total, atol=1e-5)
    (g_s,) = torch.autograd.grad(sampled.total, student)
    (g_d,) = torch.autograd.grad(dense.total, student)
    assert torch.allclose(g_s, g_d, atol=1e-5)


def test_sampled_gradient_is_unbiased() -> None:
    teacher = torch.tensor([[1.5, 0.5, 0.0, -0.5, -2.0, 0.2]])
    student = torch.zeros(1, 6, requires_grad=True)
    labels, mask = torch.full((1,), -100), torch.ones(1, dtype=torch.bool)
    dense_ids, logp, logz = targets.topk_log_probs(teacher, 6, 1.0)
    dense = KDLoss(1.0, 1.0)(student, SoftTargets(dense_ids, logp, logz, 1.0, 6), labels, mask)
    (g_dense,) = torch.autograd.grad(dense.total, student)
    grads = []
    for key in range(400):  # 400 independent sets of 4 draws: each biased-looking, the mean is not
        u = torch.from_numpy(targets.hashed_uniforms(np.array([key], np.uint64), 4, 0))
        ids, counts = targets.sample_counts(teacher, 1.0, u)
        loss = SampledKDLoss(1.0, 1.0)(student, SampledTargets(ids, counts.float() / 4, 1.0, 6), labels, mask)
        grads.append(torch.autograd.grad(loss.total, student)[0])
    assert torch.allclose(torch.stack(grads).mean(0), g_dense, atol=0.03)


def test_sampled_cache_is_independent_of_batching_and_trains(token_setup, tmp_path) -> None:
    def cache(root: str, batch: int):
        config = CacheTeacherConfig(
            teacher=str(token_setup["teacher"]),
            data=str(token_setup["data"]),
            cache_dir=str(tmp_path / root),
            target_format="sampled",
            samples=12,
            batch_size=batch,
            shard_size=16,
        )
        return fmt.open_cache(cache_teacher.run(config, **QUIET).path)

    a, b = cache("a", 7), cache("b", 13)
    assert a.key == b.key and [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert a.target_format == "sampled" and a.samples == 12 and a.manifest["top_k"] == 0
    table = pa.concat_tables(a.iter_tables())
    assert table.num_rows == sum(len(s) for s in token_setup["seqs"])
    assert all(sum(c) == 12 for c in table.column("sample_counts").to_pylist())
    assert a.manifest["bytes_per_position"] < 12 * 6 + 16

    base = dict(
        data=str(token_setup["data"]),
        cache=[str(a.path)],
        cache_dir=str(tmp_path / "a"),
        student="causal-lm:layers=1,d_model=16,heads=2",
        epochs=1,
        batch_size=8,
        export_onnx=False,
    )
    run = train_student.run(TrainStudentConfig(out=str(tmp_path / "run"), alpha=0.5, **base), **QUIET)
    assert run["train_kd"] > 0 and run["train_ce"] > 0
    with pytest.raises(ConfigError, match="cannot be re-tempered"):
        train_student.run(TrainStudentConfig(out=str(tmp_path / "run2"), temperature=2.0, **base), **QUIET)


def test_sampled_targets_reject_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match="must both be"):
        SampledTargets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), 1.0, 10)
