"""The math of cached soft targets: temperature, top-k, log-partition, tail mass, fidelity."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from stages import targets

FAST = settings(max_examples=60, deadline=None)


@st.composite
def logits_and_k(draw, max_vocab: int = 40):
    n = draw(st.integers(1, 6))
    v = draw(st.integers(2, max_vocab))
    k = draw(st.integers(1, v))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 20.0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64).float() * scale, k


temperatures = st.floats(0.05, 20.0)


def test_known_values() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    ids, logp, logz = targets.topk_log_probs(logits, 1, 1.0)
    z = torch.log(torch.exp(torch.tensor(2.0)) + 2)
    assert ids.tolist() == [[0]]
    assert torch.allclose(logz, z.unsqueeze(0))
    assert torch.allclose(logp, (2.0 - z).reshape(1, 1))
    assert torch.allclose(targets.tail_mass(logp, 3), torch.tensor([2 / (torch.exp(torch.tensor(2.0)) + 2)]))


@FAST
@given(logits_and_k())
def test_t1_is_plain_softmax(case) -> None:
    logits, k = case
    ids, logp, logz = targets.topk_log_probs(logits, k, 1.0)
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(1, ids), atol=1e-5)
    assert torch.allclose(logz, torch.logsumexp(logits, -1), atol=1e-5)


@FAST
@given(logits_and_k(), temperatures)
def test_log_probs_are_full_vocabulary_softmax_at_t(case, t) -> None:
    logits, k = case
    ids, logp, logz = targets.topk_log_probs(logits, k, t)
    assert torch.allclose(logp, torch.log_softmax(logits / t, -1).gather(1, ids), atol=1e-4)
    # The raw top-k logits come back exactly from logp and logZ: what re-tempering relies on.
    assert torch.allclose(t * (logp + logz[:, None]), logits.gather(1, ids), atol=1e-3 * max(1.0, t))


@FAST
@given(logits_and_k(), temperatures)
def test_topk_ids_are_the_true_topk(case, t) -> None:
    logits, k = case
    ids, logp, _ = targets.topk_log_probs(logits, k, t)
    kth = logits.sort(-1, descending=True).values[:, k - 1 : k]
    assert (logits.gather(1, ids) >= kth).all()
    assert (logp[:, :-1] >= logp[:, 1:]).all(), "sorted by descending probability"
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "ids are distinct"


@FAST
@given(logits_and_k(), temperatures)
def test_tail_mass_is_in_unit_interval_and_completes_the_distribution(case, t) -> None:
    logits, k = case
    v = logits.shape[1]
    _, logp, _ = targets.topk_log_probs(logits, k, t)
    tail = targets.tail_mass(logp, v)
    assert ((tail >= 0) & (tail <= 1)).all()
    assert torch.allclose(logp.exp().sum(-1) + tail, torch.ones_like(tail), atol=1e-5)
    if k == v:
        assert (tail == 0).all()


@FAST
@given(logits_and_k(), st.floats(0.1, 5.0), st.floats(1.01, 4.0))
def test_higher_temperature_raises_entropy(case, t, factor) -> None:
    logits, _ = case
    low, high = targets.entropy(logits, t), targets.entropy(logits, t * factor)
    # Equal only for a flat row; otherwise strictly larger (small float slack).
    assert (high >= low - 1e-5).all()


@FAST
@given(logits_and_k(), temperatures)
def test_fidelity_kl_is_nonnegative_and_zero_when_k_is_vocabulary(case, t) -> None:
    logits, k = case
    v = logits.shape[1]
    ids, logp, _ = targets.topk_log_probs(logits, k, t)
    kl = targets.cache_fidelity_kl(logits, t, ids, logp)
    assert (kl >= 0).all()
    dense = targets.reconstruct_log_probs(ids, logp, v)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(len(logits)), atol=1e-5)
    ids_v, logp_v, _ = targets.topk_log_probs(logits, v, t)
    # Zero up to float32 rounding, which grows with the size of the scaled logits z/T (up to ~600 here).
    rounding = 1e-6 * max(1.0, float((logits / t).abs().max()))
    assert torch.allclose(targets.cache_fidelity_kl(logits, t, ids_v, logp_v), torch.zeros(len(logits)), atol=rounding)


def test_large_vocabulary_logz_is_stable() -> None:
    # 262k vocabulary with huge logits: the shifted log-sum-exp must not overflow.
    logits = torch.randn(3, 262_144) * 50 + 1e4
    ids, logp, logz = targets.topk_log_probs(logits, 64, 0.7)
    assert torch.isfinite(logz).all() and torch.isfinite(logp).all()
    assert torch.allclose(logz, torch.logsumexp(logits / 0.7, -1), rtol=1e-6)


def test_tail_mass_keeps_float64_and_upcasts_half_precision() -> None:
    logp = torch.log_softmax(torch.randn(4, 9, dtype=torch.float64), dim=-1)[:, :3]
    assert targets.tail_mass(logp, 9).dtype == torch.float64
    assert targets.tail_mass(logp.half(), 9).dtype == torch.float32
    assert targets.tail_mass(logp, 3).dtype == torch.float64  # k == V: exact zeros in the same dtype
    torch.testing.assert_close(targets.tail_mass(logp, 9), 1 - logp.exp().sum(-1))
