"""Losses over cached soft targets: known values, sparse-vs-dense agreement, and properties.

The references here are written densely and independently of stages/losses/: full [N, V] softmaxes,
F.kl_div and F.cross_entropy, boolean indexing instead of masked_mean.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.errors import ConfigError
from stages.losses import (
    EnsembleKDLoss,
    HiddenStateLoss,
    KDLoss,
    LossOutput,
    SoftTargets,
    cross_entropy_only,
    masked_mean,
    mixture,
    retemper,
)

FAST = settings(max_examples=50, deadline=None)


# ---- references ---------------------------------------------------------------------------------------


def make_targets(logits: torch.Tensor, k: int, temperature: float) -> SoftTargets:
    """What the cache holds for teacher ``logits`` [N, V], computed in the logits' own dtype."""
    scaled = logits / temperature
    logp, ids = scaled.log_softmax(dim=-1).topk(k, dim=-1)
    return SoftTargets(ids, logp, scaled.logsumexp(dim=-1), temperature, logits.shape[-1])


def dense_log_probs(targets: SoftTargets) -> torch.Tensor:
    """[N, V] log-probabilities the cache stands for: top-k exact, tail spread uniformly over the rest."""
    n, k = targets.ids.shape
    v = targets.vocab_size
    logp = targets.logp.double()
    tail = (-torch.expm1(logp.logsumexp(dim=-1))).clamp(0, 1) if k < v else torch.zeros(n, dtype=torch.float64)
    fill = (tail / max(v - k, 1)).log()
    return fill.unsqueeze(-1).expand(n, v).clone().scatter_(-1, targets.ids, logp)


def masked_rows_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return values[rows].mean() if rows.any() else values.sum() * 0


def dense_kd(student_logits, teacher_probs, labels, mask, alpha, temperature) -> torch.Tensor:
    """alpha T^2 KL(teacher || student at T) + (1 - alpha) CE, all dense."""
    log_q = (student_logits / temperature).log_softmax(dim=-1)
    kl = F.kl_div(log_q, teacher_probs, reduction="none").sum(dim=-1)
    ce = F.cross_entropy(student_logits, labels, reduction="none", ignore_index=-100)
    kd = masked_rows_mean(kl, mask)
    ce = masked_rows_mean(ce, mask & (labels != -100))
    return alpha * temperature**2 * kd + (1 - alpha) * ce


def dense_kl_rows(student_logits, teacher_probs, temperature) -> torch.Tensor:
    log_q = (student_logits.double() / temperature).log_softmax(dim=-1)
    return F.kl_div(log_q, teacher_probs.double(), reduction="none").sum(dim=-1)


def bucketed_kl_rows(student_logits, teacher_logits, ids, temperature) -> torch.Tensor:
    """KL between the dense distributions with every id outside ``ids`` [N, k] merged into one bucket."""
    log_p = (teacher_logits.double() / temperature).log_softmax(dim=-1)
    log_q = (student_logits.double() / temperature).log_softmax(dim=-1)
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(-1, ids, False)

    def buckets(log_r):
        tail = log_r.masked_fill(~outside, -math.inf).logsumexp(dim=-1, keepdim=True)
        return torch.cat([log_r.gather(-1, ids), tail], dim=-1)

    p_b, q_b = buckets(log_p), buckets(log_q)
    return torch.where(p_b > -math.inf, p_b.exp() * (p_b - q_b), 0.0).sum(dim=-1)


def batch(n: int, v: int, seed: int, dtype=torch.float32, scale: float = 2.0):
    """Student logits, teacher logits, labels (some -100) and mask (some False)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[1::4] = False
    return student, teacher, labels, mask


def value_and_grad(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    total = out.total if isinstance(out, LossOutput) else out
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad


def assert_same_loss(fn_a, fn_b, logits, atol=1e-5) -> None:
    value_a, grad_a = value_and_grad(fn_a, logits)
    value_b, grad_b = value_and_grad(fn_b, logits)
    assert torch.allclose(value_a.double(), value_b.double(), atol=atol), (value_a, value_b)
    assert torch.allclose(grad_a.double(), grad_b.double(), atol=atol), (grad_a - grad_b).abs().max()


# ---- SoftTargets, retemper, masked_mean ----------------------------------------------------------------


def test_tail_is_exactly_zero_when_k_is_the_vocabulary():
    _, teacher, _, _ = batch(5, 7, seed=0)
    assert torch.equal(make_targets(teacher, 7, 1.0).tail(), torch.zeros(5))
    tail = make_targets(teacher, 3, 1.0).tail()
    assert ((tail > 0) & (tail < 1)).all()


def test_index_selects_rows():
    _, teacher, _, _ = batch(5, 7, seed=0)
    targets = make_targets(teacher, 3, 2.0)
    rows = torch.tensor([True, False, True, False, False])
    picked = targets.index(rows)
    assert torch.equal(picked.ids, targets.ids[rows]) and torch.equal(picked.logz, targets.logz[rows])
    assert (picked.temperature, picked.vocab_size) == (2.0, 7)


def test_retemper_at_cache_temperature_returns_identical_values():
    _, teacher, _, _ = batch(6, 10, seed=1)
    targets = make_targets(teacher, 4, 1.5)
    same = retemper(targets, 1.5)
    assert torch.equal(same.logp, targets.logp) and torch.equal(same.logz, targets.logz)
    assert torch.equal(same.ids, targets.ids) and same.temperature == 1.5


@FAST
@given(seed=st.integers(0, 2**16), v=st.integers(2, 30), t_cache=st.floats(0.3, 5), t_new=st.floats(0.2, 8))
def test_retemper_full_vocabulary_is_exact_softmax(seed, v, t_cache, t_new):
    _, teacher, _, _ = batch(4, v, seed, dtype=torch.float64)
    got = retemper(make_targets(teacher, v, t_cache), t_new)
    exact = (teacher / t_new).log_softmax(dim=-1).gather(-1, got.ids)
    assert torch.allclose(got.logp, exact, atol=1e-10)
    assert torch.allclose(got.logz, (teacher / t_new).logsumexp(dim=-1), atol=1e-10)


@FAST
@given(seed=st.integers(0, 2**16), v=st.integers(3, 30), data=st.data(), t_new=st.floats(0.2, 8))
def test_retemper_with_tail_follows_the_uniform_tail_model(seed, v, data, t_new):
    k = data.draw(st.integers(1, v - 1))
    _, teacher, _, _ = batch(4, v, seed, dtype=torch.float64)
    targets = make_targets(teacher, k, 1.0)
    got = retemper(targets, t_new)
    # Independent route: rebuild the dense uniform-tail logits, then softmax them at the new temperature.
    dense_logits = targets.temperature * (dense_log_probs(targets) + targets.logz.unsqueeze(-1))
    expected = (dense_logits / t_new).log_softmax(dim=-1)
    assert torch.allclose(got.logp, expected.gather(-1, got.ids), atol=1e-9)
    assert torch.allclose(got.logp.exp().sum(dim=-1) + got.tail(), torch.ones(4, dtype=torch.float64), atol=1e-6)
    # The uniform tail stays uniform, so going back recovers the cache. Only from above: below T_c the tail
    # shrinks like tau^(T_c / T) and can fall under the dtype's resolution, after which it cannot come back.
    back = retemper(retemper(targets, 1.0 + t_new), targets.temperature)
    assert torch.allclose(back.logp, targets.logp, atol=1e-9) and torch.allclose(back.logz, targets.logz, atol=1e-9)


def test_masked_mean_known_values_and_empty_mask():
    values = torch.tensor([1.0, 2.0, 6.0, float("inf")], requires_grad=True)
    assert masked_mean(values, torch.tensor([True, False, True, False])).item() == 3.5
    empty = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(values.grad, torch.zeros(4))


# ---- KDLoss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_full_vocabulary_kd_equals_dense_kd(alpha, temperature):
    student, teacher, labels, mask = batch(9, 12, seed=2)
    targets = make_targets(teacher, 12, 1.0)  # T = 1 uses the cache as is; the others re-temper it
    teacher_probs = (teacher / temperature).softmax(dim=-1)
    loss = KDLoss(alpha, temperature)
    assert_same_loss(
        lambda x: loss(x, targets, labels, mask),
        lambda x: dense_kd(x, teacher_probs, labels, mask, alpha, temperature),
        student,
    )


def test_parts_report_kl_and_labelled_cross_entropy():
    student, teacher, labels, mask = batch(10, 8, seed=3)
    out = KDLoss(0.3, 2.0)(student, make_targets(teacher, 8, 2.0), labels, mask)
    kl = dense_kl_rows(student, (teacher / 2.0).softmax(dim=-1), 2.0)
    labelled = mask & (labels != -100)
    ce = F.cross_entropy(student[labelled], labels[labelled])
    assert out.parts["kd"] == pytest.approx(kl[mask].mean().item(), abs=1e-5)
    assert out.parts["ce"] == pytest.approx(ce.item(), abs=1e-5)
    assert out.parts["total"] == pytest.approx(0.3 * 4 * out.parts["kd"] + 0.7 * out.parts["ce"], abs=1e-5)
    assert out.parts["total"] == pytest.approx(out.total.item())


@FAST
@given(seed=st.integers(0, 2**16), v=st.integers(3, 40), data=st.data(), t=st.floats(0.5, 4), scale=st.floats(0.1, 5))
def test_tail_bucket_kl_is_between_zero_and_dense_kl(seed, v, data, t, scale):
    k = data.draw(st.integers(1, v - 1))
    student, teacher, _, _ = batch(3, v, seed, scale=scale)
    targets = make_targets(teacher, k, t)
    loss = KDLoss(1.0, t)
    dense = dense_kl_rows(student, (teacher.double() / t).softmax(dim=-1), t)
    for row in range(3):
        only = torch.arange(3) == row
        sparse = loss(student, targets, torch.full((3,), -100), only).parts["kd"]
        assert -1e-6 <= sparse <= dense[row].item() + 1e-5


@FAST
@given(seed=st.integers(0, 2**16), v=st.integers(3, 40), data=st.data(), t=st.floats(0.5, 4), scale=st.floats(0.1, 60))
def test_tail_bucket_kl_equals_dense_kl_of_bucketed_distributions(seed, v, data, t, scale):
    """Known value in fp32, including students so confident that 1 - sum(q_topk) would round to 0."""
    k = data.draw(st.integers(1, v - 1))
    student, teacher, _, _ = batch(3, v, seed, scale=scale)
    targets = make_targets(teacher, k, t)
    expected = bucketed_kl_rows(student, teacher, targets.ids, t)
    loss = KDLoss(1.0, t)
    for row in range(3):
        only = torch.arange(3) == row
        got = loss(student, targets, torch.full((3,), -100), only).parts["kd"]
        assert got == pytest.approx(expected[row].item(), rel=1e-4, abs=1e-4)


def test_overconfident_student_still_gets_tail_gradient():
    teacher = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    student = torch.tensor([[40.0, 0.0, -40.0, -40.0, -40.0, -40.0]])  # tail mass ~1e-35, far below fp32 eps
    targets = make_targets(teacher, 2, 1.0)
    loss = KDLoss(1.0, 1.0)
    value, grad = value_and_grad(lambda x: loss(x, targets, torch.tensor([-100]), torch.tensor([True])), student)
    assert value.item() == pytest.approx(bucketed_kl_rows(student, teacher, targets.ids, 1.0).item(), rel=1e-5)
    assert (grad[0, 2:] < 0).all()  # descent raises the tail ids towards the teacher's tail mass


@FAST
@given(seed=st.integers(0, 2**16), v=st.integers(3, 40), data=st.data())
def test_tail_bucket_kl_is_exact_when_student_matches_teacher_on_the_tail(seed, v, data):
    k = data.draw(st.integers(1, v - 1))
    _, teacher, labels, mask = batch(6, v, seed, dtype=torch.float64)
    targets = make_targets(teacher, k, 1.0)
    loss = KDLoss(1.0, 1.0)
    # The same logits as the teacher off the top-k: q / p is constant over the tail, so bucketing loses nothing.
    shift = torch.randn(6, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    student = teacher.scatter_add(-1, targets.ids, shift)
    dense = dense_kd(student, teacher.softmax(dim=-1), labels, mask, 1.0, 1.0)
    assert loss(student, targets, labels, mask).total.item() == pytest.approx(dense.item(), abs=1e-9)
    assert loss(teacher, targets, labels, mask).total.item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("k", [3, 7])
def test_renormalized_kd_equals_dense_kl_of_renormalized_distributions(k):
    student, teacher, labels, mask = batch(8, 7, seed=4, dtype=torch.float64)
    targets = make_targets(teacher, k, 1.0)
    on_topk = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, targets.ids, True)

    def reference(x):
        log_p = (teacher / 2.0).masked_fill(~on_topk, -math.inf).log_softmax(dim=-1)
        log_q = (x / 2.0).masked_fill(~on_topk, -math.inf).log_softmax(dim=-1)
        kl = torch.where(on_topk, log_p.exp() * (log_p - log_q), 0.0).sum(dim=-1)
        return masked_rows_mean(kl, mask) * 0.5 * 4 + 0.5 * dense_kd(x, teacher.softmax(-1), labels, mask, 0.0, 1.0)

    loss = KDLoss(0.5, 2.0, renormalize=True)
    assert_same_loss(lambda x: loss(x, targets, labels, mask), reference, student, atol=1e-10)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [3, 6])
def test_kd_gradcheck(renormalize, k):
    student, teacher, labels, mask = batch(4, 6, seed=5, dtype=torch.float64)
    targets = make_targets(teacher, k, 1.0)
    loss = KDLoss(0.7, 2.0, renormalize=renormalize)
    x = student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loss(s, targets, labels, mask).total, (x,))


def test_half_precision_logits_are_upcast():
    student, teacher, labels, mask = batch(6, 9, seed=6)
    out = KDLoss(0.5, 2.0)(student.bfloat16(), make_targets(teacher, 4, 1.0), labels, mask)
    assert out.total.dtype == torch.float32 and math.isfinite(out.total.item())


def test_unlabelled_rows_train_on_kd_alone():
    student, teacher, labels, mask = batch(8, 6, seed=7)
    targets = make_targets(teacher, 3, 1.0)
    loss = KDLoss(0.5, 1.0)
    unlabelled = labels == -100
    grad = value_and_grad(lambda x: loss(x, targets, labels, mask), student)[1]
    kd_only = value_and_grad(lambda x: KDLoss(1.0, 1.0)(x, targets, labels, mask), student)[1]
    # The CE term adds no gradient to unlabelled rows: there the gradient is alpha T^2 times the KD gradient.
    assert torch.allclose(grad[unlabelled], 0.5 * kd_only[unlabelled], atol=1e-7)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


def test_cross_entropy_only_matches_the_ce_part():
    student, teacher, labels, mask = batch(10, 8, seed=19)
    out = cross_entropy_only(student, labels, mask)
    labelled = mask & (labels != -100)
    assert out.total.item() == pytest.approx(F.cross_entropy(student[labelled], labels[labelled]).item(), abs=1e-6)
    kd_loss = KDLoss(0.0, 2.0)(student, make_targets(teacher, 3, 1.0), labels, mask)
    assert out.parts["ce"] == pytest.approx(kd_loss.parts["ce"])
    assert cross_entropy_only(student, torch.full((10,), -100), mask).total.item() == 0.0


def test_all_unlabelled_batch_gives_zero_ce_and_no_nan():
    student, teacher, _, mask = batch(5, 6, seed=8)
    labels = torch.full((5,), -100)
    x = student.requires_grad_(True)
    out = KDLoss(0.4, 1.0)(x, make_targets(teacher, 2, 1.0), labels, mask)
    assert out.parts["ce"] == 0.0 and math.isfinite(out.total.item())
    out.total.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss", [KDLoss(0.5, 2.0), EnsembleKDLoss(0.5, 2.0), EnsembleKDLoss(0.5, 2.0, mode="logit")])
def test_empty_mask_gives_zero_with_grad(loss):
    student, teacher, labels, _ = batch(4, 6, seed=9)
    targets = make_targets(teacher, 3, 1.0)
    x = student.requires_grad_(True)
    out = loss(x, targets if isinstance(loss, KDLoss) else [targets], labels, torch.zeros(4, dtype=torch.bool))
    assert out.total.item() == 0.0 and out.total.requires_grad
    out.total.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ---- EnsembleKDLoss and mixture ---------------------------------------------------------------------


def teachers(n: int, v: int, ks: list[int], seed: int, temperatures=None, dtype=torch.float32):
    """Teacher logits sharing a common part, so their top-k ids overlap, and their soft targets."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    logits = [(base + torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype) for _ in ks]
    temperatures = temperatures or [1.0] * len(ks)
    return logits, [make_targets(z, k, t) for z, k, t in zip(logits, ks, temperatures)]


@pytest.mark.parametrize("mode", ["prob", "logit"])
@pytest.mark.parametrize("k", [3, 8])
def test_ensemble_of_one_teacher_equals_kd(mode, k):
    student, teacher, labels, mask = batch(7, 8, seed=10)
    targets = make_targets(teacher, k, 1.0)
    single, ensemble = KDLoss(0.6, 2.0), EnsembleKDLoss(0.6, 2.0, weights=[3.0], mode=mode)
    assert_same_loss(
        lambda x: single(x, targets, labels, mask), lambda x: ensemble(x, [targets], labels, mask), student
    )


@FAST
@given(
    seed=st.integers(0, 2**16),
    v=st.integers(2, 25),
    data=st.data(),
)
def test_mixture_sums_to_one_and_matches_the_dense_mixture(seed, v, data):
    ks = data.draw(st.lists(st.integers(1, v), min_size=1, max_size=4))
    weights = data.draw(st.lists(st.floats(0.01, 10), min_size=len(ks), max_size=len(ks)))
    _, cached = teachers(3, v, ks, seed, dtype=torch.float64)
    ids, probs, valid, tail = mixture(cached, weights)
    assert torch.allclose(probs.sum(dim=-1) + tail, torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert (probs[~valid] == 0).all() and (tail >= 0).all()
    for row in range(3):  # each union id is listed exactly once
        listed = ids[row][valid[row]]
        assert listed.unique().numel() == listed.numel() == ids[row].unique().numel()
    # Against the dense mixture of the uniform-tail reconstructions.
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    dense = sum(wm * dense_log_probs(t).exp() for wm, t in zip(w, cached))
    assert torch.allclose(probs[valid], dense.gather(-1, ids)[valid], atol=1e-9)
    assert torch.allclose(tail, 1 - (dense.gather(-1, ids) * valid).sum(dim=-1), atol=1e-9)


def test_mixture_of_one_full_teacher_is_its_softmax():
    logits, cached = teachers(4, 5, [5], seed=11, dtype=torch.float64)
    ids, probs, valid, tail = mixture(cached)
    assert valid.all() and torch.equal(tail, torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(probs, logits[0].softmax(dim=-1).gather(-1, ids), atol=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_full_vocabulary_prob_ensemble_equals_dense_mixture_kd(temperature):
    student, _, labels, mask = batch(6, 9, seed=12)
    logits, cached = teachers(6, 9, [9, 9, 9], seed=12, temperatures=[1.0, 2.0, 0.7])
    weights = [1.0, 2.0, 5.0]
    dense = sum(w / 8 * (z / temperature).softmax(dim=-1) for w, z in zip(weights, logits))
    loss = EnsembleKDLoss(0.5, temperature, weights=weights)
    assert_same_loss(
        lambda x: loss(x, cached, labels, mask),
        lambda x: dense_kd(x, dense, labels, mask, 0.5, temperature),
        student,
    )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_full_vocabulary_logit_ensemble_equals_dense_kd_on_averaged_logits(temperature):
    student, _, labels, mask = batch(6, 9, seed=13)
    logits, cached = teachers(6, 9, [9, 9], seed=13, temperatures=[1.0, 2.5])
    averaged = 0.25 * logits[0] + 0.75 * logits[1]
    loss = EnsembleKDLoss(0.5, temperature, weights=[1.0, 3.0], mode="logit")
    assert_same_loss(
        lambda x: loss(x, cached, labels, mask),
        lambda x: dense_kd(x, (averaged / temperature).softmax(dim=-1), labels, mask, 0.5, temperature),
        student,
    )


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_ensemble_weights_are_normalised(mode):
    student, _, labels, mask = batch(5, 10, seed=14)
    _, cached = teachers(5, 10, [3, 5], seed=14)
    a = EnsembleKDLoss(0.5, 2.0, weights=[2.0, 6.0], mode=mode)(student, cached, labels, mask)
    b = EnsembleKDLoss(0.5, 2.0, weights=[0.25, 0.75], mode=mode)(student, cached, labels, mask)
    assert a.total.item() == pytest.approx(b.total.item(), abs=1e-6)


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_ensemble_kl_is_nonnegative_and_zero_for_a_matching_student(mode):
    _, cached = teachers(4, 6, [6, 6], seed=15, dtype=torch.float64)
    labels, mask = torch.full((4,), -100), torch.ones(4, dtype=torch.bool)
    loss = EnsembleKDLoss(1.0, 1.0, mode=mode)
    if mode == "prob":
        target = torch.log(0.5 * dense_log_probs(cached[0]).exp() + 0.5 * dense_log_probs(cached[1]).exp())
    else:
        target = sum(0.5 * (dense_log_probs(t) + t.logz.unsqueeze(-1)) for t in cached)  # averaged logits
    assert loss(target, cached, labels, mask).total.item() == pytest.approx(0.0, abs=1e-10)
    other = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert loss(other, cached, labels, mask).total.item() > 0


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_confident_teachers_with_disjoint_top_ids_give_a_finite_loss(mode):
    # In fp32 these teachers' tails round to exactly 0; logit mode must not give the other's ids a -inf logit.
    first = make_targets(torch.tensor([[100.0, 0, 0, 0, 0, 0]]), 1, 1.0)
    second = make_targets(torch.tensor([[0, 100.0, 0, 0, 0, 0]]), 1, 1.0)
    assert first.tail().item() == 0.0
    x = torch.zeros(1, 6, requires_grad=True)
    out = EnsembleKDLoss(1.0, 1.0, mode=mode)(x, [first, second], torch.tensor([-100]), torch.tensor([True]))
    assert out.parts["kd"] == pytest.approx(math.log(3), abs=1e-4)  # half the mass on each of two ids, q = 1/6
    out.total.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_ensemble_gradcheck(mode):
    student, _, labels, mask = batch(4, 7, seed=16, dtype=torch.float64)
    _, cached = teachers(4, 7, [2, 3, 7], seed=16, temperatures=[1.0, 2.0, 1.0], dtype=torch.float64)
    loss = EnsembleKDLoss(0.7, 1.5, weights=[1.0, 2.0, 3.0], mode=mode)
    x = student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loss(s, cached, labels, mask).total, (x,))


@pytest.mark.parametrize("mode", ["prob", "logit"])
@FAST
@given(seed=st.integers(0, 2**16), v=st.integers(2, 20), data=st.data(), t=st.floats(0.5, 4))
def test_ensemble_kl_is_nonnegative(mode, seed, v, data, t):
    ks = data.draw(st.lists(st.integers(1, v), min_size=1, max_size=3))
    student, _, labels, mask = batch(4, v, seed)
    _, cached = teachers(4, v, ks, seed)
    out = EnsembleKDLoss(0.5, t, mode=mode)(student, cached, labels, mask)
    assert out.parts["kd"] >= -1e-6 and math.isfinite(out.total.item())


# ---- HiddenStateLoss -----------------------------------------------------------------------------------


def test_hidden_mse_known_values_and_mask():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 5.0]])
    loss = HiddenStateLoss("mse")
    assert loss(student, teacher, torch.tensor([True, True])).parts["hidden"] == pytest.approx(1.5)
    assert loss(student, teacher, torch.tensor([True, False])).total.item() == pytest.approx(2.5)
    assert loss(student, teacher, torch.tensor([False, True])).total.item() == pytest.approx(0.5)


def test_hidden_cosine_known_values_and_mask():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, 0.0]])
    loss = HiddenStateLoss("cosine")
    assert loss(student, teacher, torch.tensor([True, True, False])).total.item() == pytest.approx(0.5)
    assert loss(student, teacher, torch.tensor([False, False, True])).total.item() == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_identical_inputs_give_zero(kind):
    hidden = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    out = HiddenStateLoss(kind)(hidden, hidden.clone(), torch.ones(5, dtype=torch.bool))
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(out.parts) == {"hidden"}


# ---- bad arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda: KDLoss(1.5, 1.0), "1.5"),
        (lambda: KDLoss(-0.1, 1.0), "-0.1"),
        (lambda: KDLoss(0.5, 0), "got 0"),
        (lambda: KDLoss(0.5, -1.0), "-1.0"),
        (lambda: KDLoss(0.5, float("nan")), "nan"),
        (lambda: EnsembleKDLoss(1.5, 1.0), "1.5"),
        (lambda: EnsembleKDLoss(0.5, 0), "got 0"),
        (lambda: EnsembleKDLoss(0.5, 1.0, weights=[1.0, -2.0]), "-2.0"),
        (lambda: EnsembleKDLoss(0.5, 1.0, weights=[1.0, 0.0]), "0.0"),
        (lambda: EnsembleKDLoss(0.5, 1.0, mode="geometric"), "geometric"),
        (lambda: HiddenStateLoss("l1"), "l1"),
        (lambda: retemper(make_targets(torch.zeros(2, 4), 2, 1.0), -1.0), "-1.0"),
        (lambda: make_targets(torch.zeros(2, 4), 2, 0.0), "got 0"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_value(make, shown):
    with pytest.raises(ConfigError, match=shown.replace(".", r"\.")):
        make()


def test_wrong_number_of_weights_is_rejected():
    student, _, labels, mask = batch(3, 6, seed=17)
    _, cached = teachers(3, 6, [2, 3], seed=17)
    with pytest.raises(ConfigError, match=r"3 teacher weights \[1\.0, 1\.0, 1\.0\] for 2 teachers"):
        EnsembleKDLoss(0.5, 1.0, weights=[1.0, 1.0, 1.0])(student, cached, labels, mask)
    with pytest.raises(ConfigError, match="1 teacher weights"):
        mixture(cached, [1.0])


def test_mismatched_shapes_are_rejected():
    student, teacher, labels, mask = batch(4, 6, seed=18)
    targets = make_targets(teacher, 3, 1.0)
    with pytest.raises(ConfigError, match="V=6"):
        KDLoss(0.5, 1.0)(student[:, :5], targets, labels, mask)
    with pytest.raises(ConfigError, match="bool"):
        KDLoss(0.5, 1.0)(student, targets, labels, mask.long())
    with pytest.raises(ConfigError, match="at least one"):
        EnsembleKDLoss(0.5, 1.0)(student, [], labels, mask)


def test_index_over_a_token_grid_keeps_the_masked_positions_in_row_major_order():
    _, teacher, _, _ = batch(6, 7, seed=3)
    flat = make_targets(teacher, 3, 1.0)
    grid = SoftTargets(flat.ids.reshape(2, 3, 3), flat.logp.reshape(2, 3, 3), flat.logz.reshape(2, 3), 1.0, 7)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    picked = grid.index(keep)
    rows = keep.reshape(-1)
    assert torch.equal(picked.ids, flat.ids[rows]) and torch.equal(picked.logp, flat.logp[rows])
    assert torch.equal(picked.tail(), flat.tail()[rows])


def test_losses_reject_targets_that_were_not_flattened():
    student, teacher, labels, mask = batch(4, 6, seed=19)
    t = make_targets(teacher, 3, 1.0)
    grid = SoftTargets(t.ids.reshape(2, 2, 3), t.logp.reshape(2, 2, 3), t.logz.reshape(2, 2), 1.0, 6)
    with pytest.raises(ConfigError, match=r"ids \(2, 2, 3\) \(want \[N, k\]\)"):
        KDLoss(0.5, 1.0)(student, grid, labels, mask)
