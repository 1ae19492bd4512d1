"""benchmarks/encoding_students.py: the paired statistics behind "int8 is within noise"."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from benchmarks.encoding_students import paired_stats

T_975_DF2 = 4.302652729911275  # Student t, 97.5th percentile, 2 degrees of freedom (3 seeds)


def test_known_values() -> None:
    p = paired_stats([1.0, 2.0, 3.0], [1.1, 2.3, 3.2])
    assert p["diffs"] == pytest.approx([0.1, 0.3, 0.2])
    assert p["mean"] == pytest.approx(0.2)
    assert p["sd"] == pytest.approx(0.1)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert p["ci"] == pytest.approx([0.2 - half, 0.2 + half])
    assert p["seed_sd"] == pytest.approx(1.0)
    assert p["within_noise"]  # 0.2 + 0.25 < 1: the encoding moves less than another seed does


def test_a_shift_as_large_as_the_seed_spread_is_not_within_noise() -> None:
    assert not paired_stats([1.0, 2.0, 3.0], [2.0, 3.1, 3.9])["within_noise"]  # mean shift 1.0 = seed sd


def test_a_small_mean_with_a_wide_interval_is_not_within_noise() -> None:
    # Mean 0.05 is half the seed sd 0.1, but the 95% interval (+-0.25) reaches past it: undecided, so "no".
    p = paired_stats([1.0, 1.1, 1.2], [1.05, 1.05, 1.35])
    assert abs(p["mean"]) < p["seed_sd"]
    assert not p["within_noise"]


def test_identical_runs_are_within_noise() -> None:
    p = paired_stats([3.1, 3.3, 3.2], [3.1, 3.3, 3.2])
    assert p["mean"] == 0 and p["ci"] == [0, 0] and p["within_noise"]


@pytest.mark.parametrize("reference, other", [([1.0], [1.0]), ([1.0, 2.0], [1.0, 2.0, 3.0])])
def test_needs_two_paired_seeds(reference, other) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        paired_stats(reference, other)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-100, 100), st.floats(-100, 100)),
        min_size=2,
        max_size=8,
    ).filter(lambda pairs: np.ptp([b - a for a, b in pairs]) > 1e-6)
)
def test_interval_agrees_with_scipys_paired_t_test(pairs) -> None:
    reference, other = [a for a, _ in pairs], [b for _, b in pairs]
    p = paired_stats(reference, other)
    low, high = stats.ttest_rel(other, reference).confidence_interval(0.95)
    assert p["ci"] == pytest.approx([low, high], rel=1e-6, abs=1e-9)
