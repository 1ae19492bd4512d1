"""Distillation from sampled soft targets (the cache's ``sampled`` format).

Per position the cache holds D ids drawn from the teacher's softmax(z / T) and how often each was drawn.
``counts / D`` is an unbiased estimate of the teacher's distribution, so the cross-entropy against it is an
unbiased estimate of the cross-entropy against the teacher, and its gradient of the KD gradient: the
random-sampling KD of Anshumann et al. (2025), "Sparse Logit Sampling". Top-k caching, by contrast, always
drops the same tail and so is biased toward the head of the distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stages.errors import ConfigError
from stages.losses.common import LossOutput, SoftTargetLoss, check_batch, check_temperature, upcast


@dataclass(frozen=True)
class SampledTargets:
    """One teacher's sampled soft targets for positions on leading axes P (``[N]`` for the loss).

    ids: [*P, D] int64 distinct drawn ids (padding slots arbitrary); weights: [*P, D] count / D (0 = padding).
    temperature: the T the ids were drawn at; vocab_size: V.
    """

    ids: Tensor
    weights: Tensor
    temperature: float
    vocab_size: int

    def __post_init__(self) -> None:
        if self.ids.shape != self.weights.shape or self.ids.dim() < 2:
            raise ConfigError(
                f"SampledTargets: ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} "
                "must both be [N, D]"
            )
        check_temperature(self.temperature)

    def index(self, rows: Tensor) -> SampledTargets:
        """The targets of the selected positions (``rows``: a bool mask of shape P, or int64 indices)."""
        return SampledTargets(self.ids[rows], self.weights[rows], self.temperature, self.vocab_size)

    def to(self, device: torch.device) -> SampledTargets:
        """The same targets on ``device``."""
        return SampledTargets(
            self.ids.to(device, non_blocking=True),
            self.weights.to(device, non_blocking=True),
            self.temperature,
            self.vocab_size,
        )


class SampledKDLoss(SoftTargetLoss):
    """``alpha * T^2 * KL(p_hat || p_student,T) + (1 - alpha) * CE``, where p_hat = counts / D.

    forward(student_logits [N, V], targets: SampledTargets, labels [N], mask [N]) -> LossOutput with parts
    "kd", "ce", "total". The KL is against the empirical distribution of the draws (its gradient equals the
    cross-entropy's, an unbiased estimate of the dense KD gradient). Draws cannot be re-tempered: training T
    must equal the cache's.
    """

    def forward(self, student_logits: Tensor, targets: SampledTargets, labels: Tensor, mask: Tensor) -> LossOutput:
        if targets.temperature != self.temperature:
            raise ConfigError(
                f"sampled targets were drawn at T={targets.temperature}; they cannot be re-tempered to "
                f"T={self.temperature}. Train at the cache's temperature, or cache again at the T you want."
            )
        check_batch(student_logits, [targets], labels, mask)
        x = upcast(student_logits)
        scaled = x if self.temperature == 1 else x / self.temperature
        log_partition = torch.logsumexp(scaled, dim=-1)
        log_q = scaled.gather(-1, targets.ids) - log_partition.unsqueeze(-1)
        w = targets.weights.to(x.dtype)
        # Padding slots have weight 0 and add nothing (0 log 0 = 0), whatever id they hold.
        kd = (torch.xlogy(w, w) - w * log_q).sum(dim=-1)
        return self._combine(kd, x, labels, mask, log_partition if self.temperature == 1 else None)
