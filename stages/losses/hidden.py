"""Hidden-state matching for progressive distillation: student features against the teacher's cached ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.config import HIDDEN_LOSSES
from stages.errors import ConfigError
from stages.losses.common import LossOutput, masked_mean


class HiddenStateLoss(nn.Module):
    """Distance between student and teacher hidden states, per position, averaged over the mask.

    forward(student_hidden [N, D], teacher_hidden [N, D], mask [N] bool) -> LossOutput with parts {"hidden"}.
    Its signature differs from the soft-target losses because it compares features, not distributions. Both
    inputs must already have width D: projecting the student's width onto the teacher's is the trainer's
    job, since the projection is a trained parameter.

    kind "mse": mean over D of the squared difference. kind "cosine": 1 - cosine similarity.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in HIDDEN_LOSSES:
            raise ConfigError(f"hidden-state loss kind must be one of {HIDDEN_LOSSES}, got {kind!r}")
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
