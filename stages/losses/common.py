"""What the soft-target losses share: the targets' type, the sparse KL with its tail bucket, the batch checks,
the upcast, the masked mean, cross-entropy, and the base class that combines KD with CE."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from stages.errors import ConfigError
from stages.targets import tail_mass

IGNORE_INDEX = -100  # label of a position without a hard target (PyTorch's cross-entropy convention)


@dataclass(frozen=True)
class SoftTargets:
    """One teacher's top-k soft targets, as the cache stores them, for positions laid out on leading axes P
    (``[N]`` for the losses; ``[B, S]`` in a token batch before ``flatten``).

    ids: [*P, k] int64, the teacher's top-k ids by descending probability.
    logp: [*P, k] float, ``z_i / temperature - logz``: log-probabilities under the full-vocabulary softmax.
    logz: [*P] float, ``logsumexp(z / temperature)`` over the full vocabulary (z: the teacher's logits).
    temperature: the temperature the cache was written at.
    vocab_size: V, the size of the teacher's output vocabulary (number of classes for a classifier).
    valid: [*P, k] bool, the slots that hold an id, or None for all. A top-p cache keeps a prefix of each
        position's top-k; the loader pads it to k with invalid slots (id 0, logp -inf), which count as
        probability 0 for the teacher and are left out of the student's kept mass.
    """

    ids: Tensor
    logp: Tensor
    logz: Tensor
    temperature: float
    vocab_size: int
    valid: Tensor | None = None

    def __post_init__(self) -> None:
        ids, logp, logz, valid = self.ids, self.logp, self.logz, self.valid
        if ids.dim() < 2 or ids.dtype != torch.int64 or logp.shape != ids.shape or logz.shape != ids.shape[:-1]:
            raise ConfigError(
                "SoftTargets needs ids [N, k] int64, logp [N, k] and logz [N]; got ids "
                f"{ids.dtype} {tuple(ids.shape)}, logp {tuple(logp.shape)}, logz {tuple(logz.shape)}"
            )
        if valid is not None and (valid.dtype != torch.bool or valid.shape != ids.shape):
            raise ConfigError(
                f"SoftTargets' valid mask must be bool of the ids' shape {tuple(ids.shape)}; got {valid.dtype} "
                f"{tuple(valid.shape)}"
            )
        if not 1 <= self.k <= self.vocab_size:
            raise ConfigError(f"SoftTargets has k={self.k} ids per position for V={self.vocab_size}; need 1 <= k <= V")
        check_temperature(self.temperature)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def tail(self) -> Tensor:
        """[*P] mass outside the top-k, in [0, 1], in the dtype of ``logp`` upcast to at least fp32."""
        return tail_mass(self.logp, self.vocab_size, self.valid)

    def slots(self) -> Tensor:
        """[*P, k] bool: the slots that hold an id (all of them unless ``valid`` says otherwise)."""
        return torch.ones_like(self.ids, dtype=torch.bool) if self.valid is None else self.valid

    def uncached(self) -> Tensor:
        """[*P] int64: how many of the V ids each position does not list."""
        return self.vocab_size - self.slots().sum(dim=-1)

    def listed_ids(self) -> Tensor:
        """ids [*P, k] with each invalid slot repeating the position's top-1 id (always valid), so a loss that
        knocks the listed ids out of the student's vocabulary never knocks out the padding's id 0."""
        if self.valid is None:
            return self.ids
        return torch.where(self.valid, self.ids, self.ids[..., :1])

    def index(self, rows: Tensor) -> SoftTargets:
        """The targets of the selected positions (``rows``: a bool mask of shape P, or int64 indices)."""
        valid = None if self.valid is None else self.valid[rows]
        return SoftTargets(self.ids[rows], self.logp[rows], self.logz[rows], self.temperature, self.vocab_size, valid)

    def to(self, device: torch.device) -> SoftTargets:
        """The same targets on ``device`` (non-blocking: the loader's tensors come from pinned or CPU memory)."""
        return SoftTargets(
            self.ids.to(device, non_blocking=True),
            self.logp.to(device, non_blocking=True),
            self.logz.to(device, non_blocking=True),
            self.temperature,
            self.vocab_size,
            None if self.valid is None else self.valid.to(device, non_blocking=True),
        )


@dataclass
class LossOutput:
    """What every loss returns."""

    total: Tensor  # scalar to call backward() on
    parts: dict[str, float]  # detached components, for logging only


def upcast(x: Tensor) -> Tensor:
    """x in at least fp32: half-precision inputs are upcast, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ConfigError(f"temperature must be > 0 (it divides the logits), got {temperature!r}")


def uncached_logp(targets: SoftTargets) -> Tensor:
    """[N] log-probability of each id outside the top-k when the tail is spread uniformly over them.

    -inf when there is no tail (k == V, or a tail that rounded to 0).
    """
    tail = targets.tail()
    if targets.valid is not None:  # each position's own count; where it is 0 so is the tail (log 0 = -inf)
        return tail.log() - targets.uncached().clamp(min=1).to(tail.dtype).log()
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
    check_temperature(temperature)
    if temperature == targets.temperature:
        return targets
    ratio = targets.temperature / temperature
    # Both terms below are z / T shifted by the same per-row constant ratio * logz, which cancels in logp.
    top = ratio * upcast(targets.logp)  # padding slots: ratio * -inf = -inf, still probability 0
    if targets.valid is None:
        uncached = targets.vocab_size - targets.k
        log_uncached = math.log(uncached) if uncached else -math.inf
    else:
        log_uncached = targets.uncached().to(top.dtype).log()  # log 0 = -inf: no bucket
    bucket = ratio * uncached_logp(targets) + log_uncached  # all V - k tail ids
    log_partition = torch.logsumexp(torch.cat([top, bucket.unsqueeze(-1)], dim=-1), dim=-1)
    logz = ratio * upcast(targets.logz) + log_partition
    logp = top - log_partition.unsqueeze(-1)
    return SoftTargets(targets.ids, logp, logz, temperature, targets.vocab_size, targets.valid)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [N] over ``mask`` [N] bool -> scalar.

    An empty mask gives 0 still attached to the graph (backward runs, no NaN). Rows outside the mask are
    selected away rather than multiplied by 0, so an inf or NaN there cannot reach the result.
    """
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp(min=1)


def top_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim: [N, K] -> [N]. Slots with p = 0 add 0 (0 log 0 = 0)."""
    p = log_p.exp()
    # where, not multiply: log_p = -inf gives NaN in the unused branch, which where drops in value and gradient.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def sparse_kl(log_p: Tensor, tail_p: Tensor, log_q: Tensor, log_q_tail: Tensor) -> Tensor:
    """KL(teacher || student) with every id outside the listed ones merged into one tail bucket.

    log_p: [N, K] teacher log-probabilities of the listed ids (-inf in slots to skip, e.g. repeated ids).
    tail_p: [N] teacher mass outside the listed ids.
    log_q: [N, K] student full-vocabulary log-probabilities of the same ids.
    log_q_tail: [N] log of the student's mass outside them.
    Returns [N].
    """
    return top_kl(log_p, log_q) + torch.xlogy(tail_p, tail_p) - tail_p * log_q_tail  # xlogy: 0 log 0 = 0


def check_batch(student_logits: Tensor, teachers: Sequence, labels: Tensor, mask: Tensor) -> None:
    """Raise ConfigError unless logits [N, V], each teacher's targets (ids [N, k], V), labels and mask fit together."""
    if student_logits.dim() != 2:
        raise ConfigError(f"student_logits must be [N, V]; got shape {tuple(student_logits.shape)}")
    n, vocab_size = student_logits.shape
    for t in teachers:
        if t.ids.dim() != 2 or t.ids.shape[0] != n or t.vocab_size != vocab_size:
            raise ConfigError(
                f"soft targets with ids {tuple(t.ids.shape)} (want [N, k]) and V={t.vocab_size} do not fit "
                f"student logits [N={n}, V={vocab_size}]; flatten a token batch's positions first"
            )
    if labels.shape != (n,) or mask.shape != (n,):
        raise ConfigError(f"labels and mask must be [N={n}]; got {tuple(labels.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ConfigError(f"mask must be a bool tensor, got {mask.dtype}")


def cross_entropy(x: Tensor, labels: Tensor, mask: Tensor, log_partition: Tensor | None = None) -> Tensor:
    """Mean CE of logits x [N, V] against labels [N] over the masked positions that have a label -> scalar.

    ``log_partition`` [N], if given, is ``logsumexp(x)`` already computed, which saves a pass over [N, V].
    """
    labelled = mask & (labels != IGNORE_INDEX)
    # Unlabelled rows need some valid index to gather; labelled excludes them from the mean.
    picked = x.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if log_partition is None:
        log_partition = torch.logsumexp(x, dim=-1)
    return masked_mean(log_partition - picked, labelled)


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


class SoftTargetLoss(nn.Module):
    """What KDLoss and EnsembleKDLoss share: argument checks, the student side, the hard-label term."""

    def __init__(self, alpha: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha!r}")
        check_temperature(temperature)
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
        ce = cross_entropy(x, labels, mask, log_partition if self.temperature == 1 else None)
        kd = masked_mean(kd, mask)
        total = self.alpha * self.temperature**2 * kd + (1.0 - self.alpha) * ce
        kd_value, ce_value, total_value = torch.stack([kd, ce, total]).detach().tolist()  # one device sync
        return LossOutput(total, {"kd": kd_value, "ce": ce_value, "total": total_value})
