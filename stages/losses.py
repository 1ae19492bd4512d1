"""Distillation losses computed from cached top-k soft targets.

The soft-target losses are small ``nn.Module``s with one forward signature::

    forward(student_logits [N, V], targets, labels [N] int64, mask [N] bool) -> LossOutput

N counts positions (one per example for a classifier, one per token for a language model). ``labels`` holds
-100 (``IGNORE_INDEX``) where a position has no hard label; ``mask`` selects the positions that count at all.
Every reduction over positions goes through ``masked_mean``.

The cache stores log-probabilities under the teacher's FULL-vocabulary softmax, so the probability mass
outside the top-k (the tail) is known exactly. The KL keeps it as one extra bucket, compared against the
student's mass outside the same ids; bucketing ids together can only lower a KL (data-processing
inequality), and with k == V the sparse KL equals the dense one.

Math is done in fp32 or wider (``torch.promote_types(dtype, float32)``), so bf16/fp16 students are upcast and
float64 inputs stay float64 (which ``gradcheck`` needs). The student's log-softmax is never materialised
as a dense [N, V] tensor: only its values at the cached ids and its mass on the other ids are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from stages.errors import ConfigError

IGNORE_INDEX = -100  # label of a position without a hard target (PyTorch's cross-entropy convention)


@dataclass(frozen=True)
class SoftTargets:
    """One teacher's top-k soft targets for N positions, as the cache stores them.

    ids: [N, k] int64, the teacher's top-k ids by descending probability.
    logp: [N, k] float, ``z_i / temperature - logz``: log-probabilities under the full-vocabulary softmax.
    logz: [N] float, ``logsumexp(z / temperature)`` over the full vocabulary (z: the teacher's logits).
    temperature: the temperature the cache was written at.
    vocab_size: V, the size of the teacher's output vocabulary (number of classes for a classifier).
    """

    ids: Tensor
    logp: Tensor
    logz: Tensor
    temperature: float
    vocab_size: int

    def __post_init__(self) -> None:
        ids, logp, logz = self.ids, self.logp, self.logz
        if ids.dim() != 2 or ids.dtype != torch.int64 or logp.shape != ids.shape or logz.shape != ids.shape[:1]:
            raise ConfigError(
                "SoftTargets needs ids [N, k] int64, logp [N, k] and logz [N]; got ids "
                f"{ids.dtype} {tuple(ids.shape)}, logp {tuple(logp.shape)}, logz {tuple(logz.shape)}"
            )
        if not 1 <= self.k <= self.vocab_size:
            raise ConfigError(f"SoftTargets has k={self.k} ids per position for V={self.vocab_size}; need 1 <= k <= V")
        _check_temperature(self.temperature)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def tail(self) -> Tensor:
        """[N] mass outside the top-k, in [0, 1]; exactly 0 when k == V (not a rounding residue).

        ``-expm1(logsumexp(logp))`` keeps a small tail's relative precision, in the dtype of ``logp`` upcast
        to at least fp32.
        """
        logp = _upcast(self.logp)
        if self.k == self.vocab_size:
            return torch.zeros_like(logp[:, 0])
        return (-torch.expm1(torch.logsumexp(logp, dim=-1))).clamp(0.0, 1.0)

    def index(self, rows: Tensor) -> SoftTargets:
        """The targets of the selected positions (``rows``: a [N] bool mask or int64 indices)."""
        return SoftTargets(self.ids[rows], self.logp[rows], self.logz[rows], self.temperature, self.vocab_size)


@dataclass
class LossOutput:
    """What every loss returns."""

    total: Tensor  # scalar to call backward() on
    parts: dict[str, float]  # detached components, for logging only


def _upcast(x: Tensor) -> Tensor:
    """x in at least fp32: half-precision inputs are upcast, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ConfigError(f"temperature must be > 0 (it divides the logits), got {temperature!r}")


def _uncached_logp(targets: SoftTargets) -> Tensor:
    """[N] log-probability of each id outside the top-k when the tail is spread uniformly over them.

    -inf when there is no tail (k == V, or a tail that rounded to 0).
    """
    tail = targets.tail()
    if targets.k == targets.vocab_size:  # no uncached ids: log(0 / 0) would be NaN
        return torch.full_like(tail, -math.inf)
    return tail.log() - math.log(targets.vocab_size - targets.k)


def retemper(targets: SoftTargets, temperature: float) -> SoftTargets:
    """The cached distribution re-expressed at ``temperature`` T.

    Within the top-k this is exact: the logits come back as ``z_i = T_c * (logp_i + logz)``. The V - k uncached
    logits are unknown, so the tail is modelled as its mass tau spread uniformly over them: each gets the
    pseudo-logit ``z_t = T_c * (log(tau / (V - k)) + logz)``, and the new partition function is
    ``Z' = sum_topk exp(z_i / T) + (V - k) * exp(z_t / T)``. The result is exact when k == V; with k < V it is
    the uniform-tail model's answer (a real tail is not uniform, so its re-tempered mass is approximate).
    ``temperature`` equal to the cache's returns ``targets`` unchanged.

    Returns SoftTargets with the same ids, logp [N, k] and logz [N] at T (in at least fp32).
    """
    _check_temperature(temperature)
    if temperature == targets.temperature:
        return targets
    ratio = targets.temperature / temperature
    # Both terms below are z / T shifted by the same per-row constant ratio * logz, which cancels in logp.
    top = ratio * _upcast(targets.logp)
    uncached = targets.vocab_size - targets.k
    bucket = ratio * _uncached_logp(targets) + (math.log(uncached) if uncached else -math.inf)  # all V - k tail ids
    log_partition = torch.logsumexp(torch.cat([top, bucket.unsqueeze(-1)], dim=-1), dim=-1)
    logz = ratio * _upcast(targets.logz) + log_partition
    return SoftTargets(targets.ids, top - log_partition.unsqueeze(-1), logz, temperature, targets.vocab_size)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [N] over ``mask`` [N] bool -> scalar.

    An empty mask gives 0 still attached to the graph (backward runs, no NaN). Rows outside the mask are
    selected away rather than multiplied by 0, so an inf or NaN there cannot reach the result.
    """
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp(min=1)


def _top_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim: [N, K] -> [N]. Slots with p = 0 add 0 (0 log 0 = 0)."""
    p = log_p.exp()
    # where, not multiply: log_p = -inf gives NaN in the unused branch, which where drops in value and gradient.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _sparse_kl(log_p: Tensor, tail_p: Tensor, log_q: Tensor, log_q_tail: Tensor) -> Tensor:
    """KL(teacher || student) with every id outside the listed ones merged into one tail bucket.

    log_p: [N, K] teacher log-probabilities of the listed ids (-inf in slots to skip, e.g. repeated ids).
    tail_p: [N] teacher mass outside the listed ids.
    log_q: [N, K] student full-vocabulary log-probabilities of the same ids.
    log_q_tail: [N] log of the student's mass outside them.
    Returns [N].
    """
    return _top_kl(log_p, log_q) + torch.xlogy(tail_p, tail_p) - tail_p * log_q_tail  # xlogy: 0 log 0 = 0


def _check_batch(student_logits: Tensor, teachers: Sequence[SoftTargets], labels: Tensor, mask: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ConfigError(f"student_logits must be [N, V]; got shape {tuple(student_logits.shape)}")
    n, vocab_size = student_logits.shape
    for t in teachers:
        if t.ids.shape[0] != n or t.vocab_size != vocab_size:
            raise ConfigError(
                f"soft targets for N={t.ids.shape[0]}, V={t.vocab_size} do not fit student logits "
                f"[N={n}, V={vocab_size}]"
            )
    if labels.shape != (n,) or mask.shape != (n,):
        raise ConfigError(f"labels and mask must be [N={n}]; got {tuple(labels.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ConfigError(f"mask must be a bool tensor, got {mask.dtype}")


def _cross_entropy(x: Tensor, labels: Tensor, mask: Tensor, log_partition: Tensor | None = None) -> Tensor:
    """Mean CE of logits x [N, V] against labels [N] over the masked positions that have a label -> scalar.

    ``log_partition`` [N], if given, is ``logsumexp(x)`` already computed, which saves a pass over [N, V].
    """
    labelled = mask & (labels != IGNORE_INDEX)
    # Unlabelled rows need some valid index to gather; labelled excludes them from the mean.
    picked = x.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if log_partition is None:
        log_partition = torch.logsumexp(x, dim=-1)
    return masked_mean(log_partition - picked, labelled)


def cross_entropy_only(student_logits: Tensor, labels: Tensor, mask: Tensor) -> LossOutput:
    """Plain supervised loss, for a student trained without a teacher.

    student_logits [N, V], labels [N] (-100: no label), mask [N] bool -> LossOutput with parts "ce", "total".
    """
    _check_batch(student_logits, [], labels, mask)
    ce = _cross_entropy(_upcast(student_logits), labels, mask)
    value = ce.item()
    return LossOutput(ce, {"ce": value, "total": value})


class _SplitAtIds(torch.autograd.Function):
    """``x / T`` split at the listed ids: their values [N, K] and the logsumexp over every other id [N].

    The same as ``(x / T).gather(-1, ids)`` and ``(x / T).scatter(-1, ids, lowest).logsumexp(-1)`` under
    autograd, written out because that chain costs six [N, V] temporaries in backward (the division's, the
    knock-out's, the logsumexp's three, the gather's) and this backward costs one: the softmax over the other
    ids, into which the listed ids' gradients are added. Only one [N, V] tensor is kept for backward (the
    logits at T with the listed ids knocked out), as before.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        listed = x.gather(-1, ids) / temperature
        # The lowest finite value rather than -inf: a row with no other ids (k == V) then keeps finite
        # gradients, and contributes nothing because its teacher tail is exactly 0.
        lowest = torch.finfo(x.dtype).min
        if temperature == 1:  # dividing by 1 would copy [N, V] for nothing
            knocked_out = x.scatter(-1, ids, lowest)
        else:
            knocked_out = (x / temperature).scatter_(-1, ids, lowest)
        others = knocked_out.logsumexp(dim=-1)
        ctx.save_for_backward(knocked_out, others, ids)
        ctx.temperature = temperature
        return listed, others

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_listed: Tensor, grad_others: Tensor) -> tuple[Tensor, None, None]:
        knocked_out, others, ids = ctx.saved_tensors
        grad = (knocked_out - others.unsqueeze(-1)).exp_()  # d others / d (x_j / T): softmax over the other ids
        grad.mul_(grad_others.unsqueeze(-1)).scatter_(-1, ids, 0.0)  # the listed ids are not among the others
        grad.scatter_add_(-1, ids, grad_listed)  # add, not set: an id may be listed twice (ensemble unions)
        return grad.div_(ctx.temperature), None, None


class _SoftTargetLoss(nn.Module):
    """What KDLoss and EnsembleKDLoss share: argument checks, the student side, the hard-label term."""

    def __init__(self, alpha: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha!r}")
        _check_temperature(temperature)
        self.alpha = alpha  # weight of the KL term; 1 - alpha goes to cross-entropy on the labels
        self.temperature = temperature  # softens both distributions; T^2 keeps the KL's gradient scale T-independent

    def _student_log_probs(self, x: Tensor, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The student's softmax(x / T) seen through the listed ids.

        x: [N, V] upcast logits; ids: [N, K]; valid: [N, K] bool, the slots that count (each id once).
        Returns log q at ``ids`` [N, K], log q_tail [N] (the log of the mass on every other id), and the
        log-partition ``logsumexp(x / T)`` [N] over the full vocabulary (the valid slots list each id once).

        q_tail is summed over the other ids directly: ``1 - sum q_i`` cancels to 0 in floating point once the
        student's tail falls below the dtype's resolution, which would also cut off the tail's gradient.
        """
        listed, others = _SplitAtIds.apply(x, ids, self.temperature)
        log_partition = torch.logaddexp(others, listed.masked_fill(~valid, -math.inf).logsumexp(dim=-1))
        return listed - log_partition.unsqueeze(-1), others - log_partition, log_partition

    def _combine(
        self, kd: Tensor, x: Tensor, labels: Tensor, mask: Tensor, log_partition: Tensor | None = None
    ) -> LossOutput:
        """kd [N] per-position KL, x [N, V] upcast student logits -> alpha T^2 KD + (1 - alpha) CE, both means.

        log_partition: ``logsumexp(x / T)`` [N] if the KL computed it. At T = 1 it is also CE's, which then
        costs no second pass over [N, V], forward or backward.
        """
        ce = _cross_entropy(x, labels, mask, log_partition if self.temperature == 1 else None)
        kd = masked_mean(kd, mask)
        total = self.alpha * self.temperature**2 * kd + (1.0 - self.alpha) * ce
        kd_value, ce_value, total_value = torch.stack([kd, ce, total]).detach().tolist()  # one device sync
        return LossOutput(total, {"kd": kd_value, "ce": ce_value, "total": total_value})


class KDLoss(_SoftTargetLoss):
    """``alpha * T^2 * KL(p_teacher,T || p_student,T) + (1 - alpha) * CE(student_logits, labels)``.

    forward(student_logits [N, V], targets: SoftTargets, labels [N], mask [N]) -> LossOutput with parts
    "kd" (the mean KL, before alpha * T^2), "ce" and "total". Targets cached at another temperature are
    re-tempered (``retemper``). The KL covers the top-k plus a tail bucket; ``renormalize=True`` instead
    compares the teacher's and the student's distributions each renormalised within the teacher's top-k
    (the classic sparse-KD loss: it ignores the tail, so needs no tail model at any T). KD is averaged over
    ``mask``, CE over the masked positions that have a label, so unlabelled positions train on KD alone.
    """

    def __init__(self, alpha: float, temperature: float, renormalize: bool = False) -> None:
        super().__init__(alpha, temperature)
        self.renormalize = renormalize  # False: tail bucket (exact for k == V); True: top-k only

    def forward(self, student_logits: Tensor, targets: SoftTargets, labels: Tensor, mask: Tensor) -> LossOutput:
        _check_batch(student_logits, [targets], labels, mask)
        x = _upcast(student_logits)
        teacher = retemper(targets, self.temperature)
        log_p = teacher.logp.to(x.dtype)
        log_partition = None  # the top-k-only KL never sums over the full vocabulary
        if self.renormalize:
            log_q = (x.gather(-1, teacher.ids) / self.temperature).log_softmax(dim=-1)
            kd = _top_kl(log_p.log_softmax(dim=-1), log_q)
        else:
            every_slot = torch.ones_like(teacher.ids, dtype=torch.bool)
            log_q, log_q_tail, log_partition = self._student_log_probs(x, teacher.ids, every_slot)
            kd = _sparse_kl(log_p, teacher.tail().to(x.dtype), log_q, log_q_tail)
        return self._combine(kd, x, labels, mask, log_partition)


class HiddenStateLoss(nn.Module):
    """Distance between student and teacher hidden states, per position, averaged over the mask.

    forward(student_hidden [N, D], teacher_hidden [N, D], mask [N] bool) -> LossOutput with parts {"hidden"}.
    Its signature differs from the soft-target losses because it compares features, not distributions. Both
    inputs must already have width D: projecting the student's width onto the teacher's is the trainer's
    job, since the projection is a trained parameter.

    kind "mse": mean over D of the squared difference. kind "cosine": 1 - cosine similarity.
    """

    def __init__(self, kind: Literal["mse", "cosine"]) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ConfigError(f"hidden-state loss kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind = kind

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> LossOutput:
        if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
            raise ConfigError(
                f"hidden states must both be [N, D]; got student {tuple(student_hidden.shape)}, "
                f"teacher {tuple(teacher_hidden.shape)} (project to the teacher's width first)"
            )
        if mask.shape != student_hidden.shape[:1] or mask.dtype != torch.bool:
            raise ConfigError(
                f"mask must be a bool [N={student_hidden.shape[0]}] tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, teacher_hidden.dtype), torch.float32)
        s, t = student_hidden.to(dtype), teacher_hidden.to(dtype)
        if self.kind == "mse":
            per_position = (s - t).pow(2).mean(dim=-1)
        else:
            per_position = 1.0 - F.cosine_similarity(s, t, dim=-1)
        loss = masked_mean(per_position, mask)
        return LossOutput(loss, {"hidden": loss.item()})
