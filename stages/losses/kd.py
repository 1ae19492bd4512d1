"""Single-teacher distillation: Hinton KD against cached top-k soft targets, and plain cross-entropy."""

from __future__ import annotations

import math

from torch import Tensor

from stages.losses.common import (
    LossOutput,
    SoftTargetLoss,
    SoftTargets,
    check_batch,
    cross_entropy,
    retemper,
    sparse_kl,
    top_kl,
    upcast,
)


def cross_entropy_only(student_logits: Tensor, labels: Tensor, mask: Tensor) -> LossOutput:
    """Plain supervised loss, for a student trained without a teacher.

    student_logits [N, V], labels [N] (-100: no label), mask [N] bool -> LossOutput with parts "ce", "total".
    """
    check_batch(student_logits, [], labels, mask)
    ce = cross_entropy(upcast(student_logits), labels, mask)
    value = ce.item()
    return LossOutput(ce, {"ce": value, "total": value})


class KDLoss(SoftTargetLoss):
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
        check_batch(student_logits, [targets], labels, mask)
        x = upcast(student_logits)
        teacher = retemper(targets, self.temperature)
        log_p = teacher.logp.to(x.dtype)
        log_partition = None  # the top-k-only KL never sums over the full vocabulary
        ids, valid = teacher.listed_ids(), teacher.slots()
        if self.renormalize:
            # Padding slots (top-p caches) leave the student's renormalised top-k, as they leave the teacher's.
            log_q = (x.gather(-1, ids) / self.temperature).masked_fill(~valid, -math.inf).log_softmax(dim=-1)
            kd = top_kl(log_p.log_softmax(dim=-1), log_q)
        else:
            log_q, log_q_tail, log_partition = self._student_log_probs(x, ids, valid)
            kd = sparse_kl(log_p, teacher.tail().to(x.dtype), log_q, log_q_tail)
        return self._combine(kd, x, labels, mask, log_partition)
