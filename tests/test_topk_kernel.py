"""The host kernel (stages/topk_kernel.py) against the definitions in stages/targets.py and float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages import targets, topk_kernel


def _logits(rng: np.random.Generator, n: int, v: int, scale: float) -> np.ndarray:
    """Distinct values (no ties), a spread like a real teacher's (a few large, a long tail)."""
    z = rng.standard_normal((n, v)) * scale
    z += rng.permuted(np.tile(np.linspace(0, 1e-3, v), (n, 1)), axis=1)  # break any tie of the normals
    return z.astype(np.float32)


def _reference(z: np.ndarray, k: int, t: float):
    """float64: top-k by descending logit (ties by id), log p, logZ."""
    z64 = z.astype(np.float64) / t
    logz = np.logaddexp.reduce(z64, axis=1)
    order = np.lexsort((np.broadcast_to(np.arange(z.shape[1]), z.shape), -z), axis=1)[:, :k]
    return order, np.take_along_axis(z64, order, 1) - logz[:, None], logz


@settings(max_examples=60, deadline=None)
@given(
    v=st.integers(1, 3000),
    n=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    t=st.floats(0.05, 20.0),
    scale=st.sampled_from([0.01, 1.0, 5.0, 40.0]),
    seed=st.integers(0, 2**31),
)
def test_top_k_and_log_partition_match_a_float64_reference(v, n, k_frac, t, scale, seed) -> None:
    rng = np.random.default_rng(seed)
    z = _logits(rng, n, v, scale)
    k = max(1, round(k_frac * v))
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(n), k, t)
    ref_ids, ref_logp, ref_logz = _reference(z, k, t)
    np.testing.assert_array_equal(ids, ref_ids)
    # float32 outputs: logZ and log p carry one float32 rounding of their magnitude plus < 2e-7 of the sum.
    tol = 2e-6 * np.maximum(1.0, np.abs(ref_logz))
    np.testing.assert_array_less(np.abs(logz - ref_logz), tol)
    np.testing.assert_array_less(np.abs(logp - ref_logp), 4e-6 * np.maximum(1.0, np.abs(ref_logp)) + tol[:, None])


@settings(max_examples=30, deadline=None)
@given(v=st.integers(2, 2500), k=st.integers(1, 40), t=st.floats(0.1, 5.0), seed=st.integers(0, 2**31))
def test_matches_the_torch_definition(v, k, t, seed) -> None:
    z = _logits(np.random.default_rng(seed), 5, v, 3.0)
    k = min(k, v)
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(5), k, t)
    t_ids, t_logp, t_logz = targets.topk_log_probs(torch.from_numpy(z), k, t)
    np.testing.assert_array_equal(ids, t_ids.numpy())
    np.testing.assert_allclose(logp, t_logp.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logz, t_logz.numpy(), rtol=1e-6, atol=1e-5)


def test_k_equal_to_v_gives_the_dense_distribution() -> None:
    z = _logits(np.random.default_rng(0), 4, 130, 2.0)
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(4), 130, 0.7)
    dense = torch.log_softmax(torch.from_numpy(z).double() / 0.7, -1).numpy()
    np.testing.assert_allclose(np.take_along_axis(dense, ids, 1), logp, atol=2e-6)
    assert (np.sort(ids, 1) == np.arange(130)).all()
    assert (targets.tail_mass_array(logp, 130) == 0).all()


def test_only_the_given_rows_are_read_and_in_their_order() -> None:
    z = _logits(np.random.default_rng(1), 10, 700, 2.0)
    rows = np.array([7, 2, 9, 2])
    ids, logp, logz = topk_kernel.topk_log_probs(z, rows, 5, 1.0)
    full = topk_kernel.topk_log_probs(z, np.arange(10), 5, 1.0)
    for got, want in zip((ids, logp, logz), full):
        np.testing.assert_array_equal(got, want[rows])


def test_ties_go_to_the_lower_id_and_a_constant_row_works() -> None:
    z = np.zeros((2, 300), np.float32)
    z[1, [250, 10, 99]] = 5.0
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(2), 4, 1.0)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert ids[1].tolist() == [10, 99, 250, 0]
    np.testing.assert_allclose(logz[0], np.log(300), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    v=st.integers(1, 6000),
    levels=st.sampled_from([1, 2, 5, 40, 1000]),
    masked=st.floats(0.0, 0.99),
    k=st.integers(1, 64),
    t=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**31),
)
def test_ties_at_the_edge_of_the_top_k(v, levels, masked, k, t, seed) -> None:
    """Logits with few distinct values (a constant row, quantised output) and part of the vocabulary at -inf:
    many group maxima reach the threshold, and only the first k logits tied at it are candidates; the top-k
    is still the lowest ids among equals, as the float64 reference orders them."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, levels, (3, v)).astype(np.float32) * np.float32(0.5)
    z[rng.random((3, v)) < masked] = -np.inf
    z[:, rng.integers(0, v)] = 0.0  # one finite logit at least
    k = min(k, v)
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(3), k, t)
    ref_ids, ref_logp, ref_logz = _reference(z, k, t)
    finite = np.isfinite(ref_logp)
    np.testing.assert_array_equal(ids[finite], ref_ids[finite])
    assert np.isneginf(logp[~finite]).all()
    np.testing.assert_array_less(np.abs(logz - ref_logz), 2e-6 * np.maximum(1.0, np.abs(ref_logz)))
    error = np.abs(logp[finite] - ref_logp[finite])
    np.testing.assert_array_less(error, 4e-6 * np.maximum(1.0, np.abs(ref_logp[finite])) + 1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_positive_infinity_gives_a_nan_log_partition(bad) -> None:
    z = _logits(np.random.default_rng(2), 3, 500, 1.0)
    z[1, 123] = bad
    _, _, logz = topk_kernel.topk_log_probs(z, np.arange(3), 8, 1.0)
    assert np.isfinite(logz[[0, 2]]).all() and np.isnan(logz[1])


def test_negative_infinity_is_a_zero_probability_not_an_error() -> None:
    z = _logits(np.random.default_rng(3), 2, 200, 1.0)
    z[:, :150] = -np.inf
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(2), 60, 1.0)
    ref_ids, ref_logp, ref_logz = _reference(z, 50, 1.0)
    np.testing.assert_array_equal(ids[:, :50], ref_ids)
    np.testing.assert_allclose(logz, ref_logz, atol=1e-6)
    assert np.isneginf(logp[:, 50:]).all()  # the other 10 of the top-60 have probability 0


def test_the_split_over_threads_does_not_change_the_result(monkeypatch) -> None:
    z = _logits(np.random.default_rng(4), 37, 1000, 2.0)
    split = topk_kernel.topk_log_probs(z, np.arange(37), 9, 1.3)
    monkeypatch.setattr(topk_kernel, "_threads", lambda: 1)
    whole = topk_kernel.topk_log_probs(z, np.arange(37), 9, 1.3)
    for a, b in zip(split, whole):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    v=st.integers(2, 3000),
    k_frac=st.floats(0.0, 1.0),
    t=st.floats(0.2, 5.0),
    prefix=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_probe_statistics_match_float64_references(v, k_frac, t, prefix, seed) -> None:
    """Entropy of the teacher at T, and the KL from it to what the cache stands for (the ids it keeps exactly, the
    stored tail spread evenly over the other ids), as targets.entropy and targets.cache_fidelity_kl define them;
    with ``prefix``, each row keeps a prefix of its top-k of its own length, as a top-p cache does."""
    rng = np.random.default_rng(seed)
    z = _logits(rng, 6, v, 3.0)
    k = max(1, round(k_frac * v))
    ids, logp, _ = topk_kernel.topk_log_probs(z, np.arange(6), k, t)
    kept = rng.integers(1, k + 1, 6) if prefix else np.full(6, k)
    valid = np.arange(k) < kept[:, None]
    tail = targets.tail_mass_array(logp, v, valid)
    entropy, kl = topk_kernel.dense_statistics(z, np.arange(6), t, ids, tail, kept if prefix else None)
    log_p = torch.log_softmax(torch.from_numpy(z).double() / t, -1).numpy()
    p = np.exp(log_p)
    np.testing.assert_allclose(entropy, -(p * log_p).sum(1), rtol=1e-5, atol=1e-6)
    other = np.ones_like(log_p, dtype=bool)
    np.put_along_axis(other, np.where(valid, ids, ids[:, :1]), False, 1)
    with np.errstate(divide="ignore"):
        spread = np.log(tail.astype(np.float64) / np.maximum(v - kept, 1))[:, None]
    ref_kl = np.where(other & (p > 0), p * (log_p - spread), 0.0).sum(1)
    # Each log p carries float32 rounding of its size: the error scales with tau |log(tau / (V - k))|, plus the
    # float32 partial sums' ~1e-7 (the kernel takes the tail as the sum over all ids less the kept ones). Where
    # the stored tail rounds to 0 but the teacher has mass there the reference is infinite; the kernel counts 0.
    finite = np.isfinite(ref_kl)
    scale = tail * (1 + np.abs(np.log(np.maximum(tail, 1e-30) / np.maximum(v - kept, 1))))
    np.testing.assert_array_less(np.abs(kl - ref_kl)[finite], (1e-4 * ref_kl + 2e-5 * scale + 3e-7)[finite])
    assert (kl[kept == v] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 50),
    extra=st.integers(0, 100),
    scale=st.floats(0.1, 30.0),
    seed=st.integers(0, 2**31),
)
def test_numpy_tail_mass_is_the_torch_formula(k, extra, scale, seed) -> None:
    z = torch.from_numpy(_logits(np.random.default_rng(seed), 4, k + extra, scale))
    _, logp, _ = targets.topk_log_probs(z, k, 1.0)
    # The same formula on the same float32 log-probs, summed in float64 by both; the result is float32.
    want = targets.tail_mass(logp.double(), k + extra).numpy()
    np.testing.assert_allclose(targets.tail_mass_array(logp.numpy(), k + extra), want, rtol=1e-6, atol=1e-30)


def test_rows_with_fewer_finite_groups_than_k_still_give_the_top_k() -> None:
    """Groups of -inf (a vocabulary masked out) leave fewer finite group maxima than k: every finite logit is a
    candidate then."""
    z = _logits(np.random.default_rng(5), 3, 1000, 2.0)
    z[:, 64:] = -np.inf  # one finite group of 64, k = 10 > 1 finite group maximum
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(3), 10, 1.0)
    ref_ids, ref_logp, ref_logz = _reference(z, 10, 1.0)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(logz, ref_logz, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    v=st.integers(1, 6000),
    layout=st.sampled_from(["ascending", "creeping", "descending", "masked prefix", "masked suffix"]),
    t=st.floats(0.05, 20.0),
    scale=st.sampled_from([0.01, 1.0, 5.0, 40.0]),
    seed=st.integers(0, 2**31),
)
def test_the_running_reference_of_the_one_pass_sum(v, layout, t, scale, seed) -> None:
    """The log-partition is summed chunk by chunk against the maximum of the chunks before: logits that rise
    steeply along the row (every chunk re-summed), that creep up (terms above the reference kept), that fall, or a
    vocabulary masked with -inf at its start or end, all against the float64 reference."""
    rng = np.random.default_rng(seed)
    z = _logits(rng, 3, v, scale)
    if layout == "ascending":
        z = np.sort(z, axis=1)
    elif layout == "creeping":  # the maximum rises by less than the reference's margin from chunk to chunk
        z = (np.linspace(0.0, 0.3 * t * v / 1024, v) + rng.uniform(0, 1e-3, (3, v))).astype(np.float32)
    elif layout == "descending":
        z = -np.sort(-z, axis=1)
    else:
        masked = rng.integers(0, v, 3)  # at least one logit stays finite
        for row, m in enumerate(masked):
            if layout == "masked prefix":
                z[row, :m] = -np.inf
            else:
                z[row, v - m :] = -np.inf
    k = int(rng.integers(1, min(v, 40) + 1))
    ids, logp, logz = topk_kernel.topk_log_probs(z, np.arange(3), k, t)
    ref_ids, ref_logp, ref_logz = _reference(z, k, t)
    np.testing.assert_array_equal(ids[np.isfinite(ref_logp)], ref_ids[np.isfinite(ref_logp)])
    np.testing.assert_array_less(np.abs(logz - ref_logz), 2e-6 * np.maximum(1.0, np.abs(ref_logz)))


@pytest.mark.parametrize("where", [100, 3000, 5999])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_bad_logit_among_masked_ones_still_gives_a_nan_log_partition(where, bad) -> None:
    """While every logit so far is -inf the running sum has no reference; a NaN or +inf there must still show."""
    z = _logits(np.random.default_rng(6), 2, 6000, 1.0)
    z[:, :5000] = -np.inf
    z[1, where] = bad
    _, _, logz = topk_kernel.topk_log_probs(z, np.arange(2), 4, 1.0)
    assert np.isfinite(logz[0]) and np.isnan(logz[1])
