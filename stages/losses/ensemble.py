"""Multi-teacher distillation: one KD loss against a mixture of teachers' cached top-k soft targets.

The teachers' top-k supports differ, so every loss here runs over the union of their ids plus one tail bucket
for the ids no teacher cached (see ``stages/losses/kd.py`` for the single-teacher loss and its conventions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stages.config import ENSEMBLE_MODES
from stages.errors import ConfigError
from stages.losses.common import (
    LossOutput,
    SoftTargetLoss,
    SoftTargets,
    check_batch,
    retemper,
    sparse_kl,
    uncached_logp,
    upcast,
)


def _check_weights(weights: Sequence[float]) -> None:
    if not all(w > 0 for w in weights):  # also rejects NaN
        raise ConfigError(f"teacher weights must all be positive, got {list(weights)}")


def _normalised_weights(weights: Sequence[float] | None, num_teachers: int) -> list[float]:
    """Weights summing to 1, one per teacher (uniform when None)."""
    if weights is None:
        return [1.0 / num_teachers] * num_teachers
    if len(weights) != num_teachers:
        raise ConfigError(f"got {len(weights)} teacher weights {list(weights)} for {num_teachers} teachers")
    _check_weights(weights)
    total = sum(weights)
    return [w / total for w in weights]


def _check_teachers(teachers: Sequence[SoftTargets]) -> None:
    if not teachers:
        raise ConfigError("an ensemble needs at least one teacher's soft targets, got none")
    first = teachers[0]
    for t in teachers[1:]:
        if t.ids.shape[0] != first.ids.shape[0] or t.vocab_size != first.vocab_size:
            raise ConfigError(
                f"ensemble teachers disagree: N={t.ids.shape[0]}, V={t.vocab_size} vs "
                f"N={first.ids.shape[0]}, V={first.vocab_size}"
            )


def _union(teachers: Sequence[SoftTargets]) -> tuple[Tensor, Tensor]:
    """All teachers' ids side by side, ids [N, K] (K = sum of k), and valid [N, K] bool marking the first
    occurrence of each distinct id, so that the valid slots list the union once."""
    ids = torch.cat([t.listed_ids() for t in teachers], dim=-1)  # a padding slot repeats an id listed before it
    # A stable sort keeps equal ids in their original order, so the head of each run is the first occurrence.
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    run_head = torch.ones_like(ids, dtype=torch.bool)
    run_head[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return ids, torch.empty_like(run_head).scatter_(-1, order, run_head)


def _logp_at(teacher: SoftTargets, ids: Tensor, uncached: Tensor) -> Tensor:
    """The teacher's log-probability of each of ``ids`` [N, K] -> [N, K]: its cached value for ids in its
    top-k, ``uncached`` [N] for the rest. Binary search per row, so memory stays O(N K)."""
    # Stable: of an id listed twice (a top-p padding slot repeats the top-1), the search finds the first, valid one.
    sorted_ids, order = teacher.listed_ids().sort(dim=-1, stable=True)
    slot = torch.searchsorted(sorted_ids, ids).clamp(max=teacher.k - 1)  # ids above the largest land at k
    cached = sorted_ids.gather(-1, slot) == ids
    logp = upcast(teacher.logp).gather(-1, order.gather(-1, slot))
    return torch.where(cached, logp, uncached.unsqueeze(-1))


def _log_mixture(teachers: Sequence[SoftTargets], weights: Sequence[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The "prob" mixture in log space: ids [N, K], log P [N, K] (-inf where not valid), valid, tail [N]."""
    ids, valid = _union(teachers)
    log_p = torch.stack(
        [math.log(w) + _logp_at(t, ids, uncached_logp(t)) for t, w in zip(teachers, weights)]
    ).logsumexp(dim=0)
    # Teacher m's mass outside the union: its uniform tail share times the V - |U| ids no teacher cached.
    # Summing these directly, rather than 1 - sum P, keeps a small tail precise.
    outside = teachers[0].vocab_size - valid.sum(dim=-1)
    # A teacher with no uncached ids has no tail (0 / 1 below), and no share to give.
    tail = sum(
        (w * t.tail() * outside / t.uncached().clamp(min=1) for t, w in zip(teachers, weights)),
        start=torch.zeros_like(log_p[:, 0]),
    )
    return ids, log_p.masked_fill(~valid, -math.inf), valid, tail


def mixture(
    targets: Sequence[SoftTargets], weights: Sequence[float] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The teachers' weighted mixture ``P = sum_m w_m p_m`` over the union of their top-k ids.

    A teacher's probability for a union id outside its own top-k is its tail mass spread uniformly over its
    V - k_m uncached ids. Each teacher is taken at its own cache temperature (``retemper`` first to mix at
    another). ``weights`` default to uniform and are normalised to sum to 1.

    Returns ids [N, U], probs [N, U], valid [N, U] bool and tail [N], with U = sum_m k_m slots: ``valid``
    marks each distinct id's first slot (probs is 0 elsewhere), and ``probs[valid]`` per row plus ``tail``
    sums to 1.
    """
    _check_teachers(targets)
    ids, log_p, valid, tail = _log_mixture(targets, _normalised_weights(weights, len(targets)))
    return ids, log_p.exp(), valid, tail


def _logit_average(
    teachers: Sequence[SoftTargets], weights: Sequence[float], temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """softmax(average teacher logits / T) over the union plus one bucket for the other V - |U| ids.

    Returns ids [N, K], log P [N, K] (-inf where not valid), valid [N, K], tail [N].
    """
    ids, valid = _union(teachers)
    logits = torch.zeros_like(ids, dtype=torch.promote_types(teachers[0].logp.dtype, torch.float32))
    tail_logit = torch.zeros_like(logits[:, 0])
    for t, w in zip(teachers, weights):
        # A tail that rounded to 0 would give every id outside this teacher's top-k a -inf logit, vetoing ids
        # the other teachers rank highly; floor the per-id tail probability at the smallest normal number.
        uncached = uncached_logp(t).clamp(min=math.log(torch.finfo(logits.dtype).tiny))
        logz = upcast(t.logz).unsqueeze(-1)
        logits = logits + w * t.temperature * (_logp_at(t, ids, uncached) + logz)
        tail_logit = tail_logit + w * t.temperature * (uncached + logz.squeeze(-1))
    scores = (logits / temperature).masked_fill(~valid, -math.inf)
    outside = teachers[0].vocab_size - valid.sum(dim=-1)  # ids no teacher cached; log 0 = -inf: no bucket
    bucket = tail_logit / temperature + outside.to(logits.dtype).log()
    log_partition = torch.logsumexp(torch.cat([scores, bucket.unsqueeze(-1)], dim=-1), dim=-1, keepdim=True)
    return ids, scores - log_partition, valid, (bucket - log_partition.squeeze(-1)).exp()


class EnsembleKDLoss(SoftTargetLoss):
    """KDLoss against an ensemble of teachers, each given as its own SoftTargets (same N and V, any k).

    forward(student_logits [N, V], targets: list[SoftTargets], labels [N], mask [N]) -> LossOutput, with the
    same alpha, T^2, CE and parts as KDLoss. The KL covers the union of the teachers' top-k ids plus a tail
    bucket for every other id.

    mode "prob": the weighted mixture of the teachers' distributions at T (see ``mixture``). Exact when every
    k == V; otherwise exact on each teacher's top-k and tail mass, with each tail spread uniformly.
    mode "logit": softmax(sum_m w_m z_m / T). Teacher logits are exact on their own top-k; elsewhere each
    teacher contributes its uniform-tail pseudo-logit ``T_c (log(tau / (V - k)) + logz)``, and the V - |U|
    ids no teacher cached share the averaged pseudo-logit. Exact when every k == V; otherwise the pseudo-logits
    stand in for unknown logits, which is a coarser approximation than "prob" mode's.
    """

    def __init__(
        self,
        alpha: float,
        temperature: float,
        weights: Sequence[float] | None = None,
        mode: str = "prob",
    ) -> None:
        super().__init__(alpha, temperature)
        if mode not in ENSEMBLE_MODES:
            raise ConfigError(f"ensemble mode must be one of {ENSEMBLE_MODES}, got {mode!r}")
        if weights is not None:
            _check_weights(weights)  # the count is checked against the teachers in forward
        self.weights = None if weights is None else [float(w) for w in weights]  # None: uniform
        self.mode = mode  # "prob": mix distributions; "logit": average logits

    def forward(
        self, student_logits: Tensor, targets: Sequence[SoftTargets], labels: Tensor, mask: Tensor
    ) -> LossOutput:
        _check_teachers(targets)
        check_batch(student_logits, targets, labels, mask)
        weights = _normalised_weights(self.weights, len(targets))
        x = upcast(student_logits)
        if self.mode == "prob":
            ids, log_p, valid, tail = _log_mixture([retemper(t, self.temperature) for t in targets], weights)
        else:
            ids, log_p, valid, tail = _logit_average(targets, weights, self.temperature)
        log_q, log_q_tail, log_partition = self._student_log_probs(x, ids, valid)
        kd = sparse_kl(log_p.to(x.dtype), tail.to(x.dtype), log_q, log_q_tail)
        return self._combine(kd, x, labels, mask, log_partition)
