"""Method progressive's hidden-state stages: before the logits, the student's layers learn the teacher's hidden
states one stage at a time, each through a learned projection, earlier stages' parameters optionally frozen.

``HiddenStage`` is one such stage's model side: its projection, its loss on a batch, and the parameters it reaches.
``stages.trainer`` runs it under the same epochs, optimizer, checkpoints and rows as the logit stage.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stages.losses import HiddenStateLoss, LossOutput


class HiddenStage:
    """Student layer ``layer`` matched to the teacher's hidden state ``name`` (per-row shape ``teacher_shape``).

    ``probe``: a batch to size the projection with; ``loss``: the --hidden-loss kind (mse or cosine).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        name: str,
        teacher_shape: list[int],
        probe,
        token_level: bool,
        loss: str,
    ):
        self.model, self.layer, self.name, self.token_level = model, layer, name, token_level
        self.loss = HiddenStateLoss(loss)
        self.projection = self._projection(probe, teacher_shape)

    def _projection(self, probe, teacher_shape: list[int]) -> nn.Module:
        """A learned map from the student's width to the teacher's; identity when they already match."""
        with torch.no_grad():
            student = self.model(probe.inputs).hidden[self.layer]
        width = student.shape[-1] if self.token_level else int(np.prod(student.shape[1:]))
        target = int(np.prod(teacher_shape))
        return (nn.Identity() if width == target else nn.Linear(width, target)).to(student.device)

    def step(self, batch) -> LossOutput:
        """The hidden-state loss on one batch: token level over its unmasked positions, else per example."""
        out = self.model(batch.inputs)
        student = out.hidden[self.layer]
        teacher = batch.hidden[0][self.name]
        if self.token_level:
            keep = batch.mask
            student, teacher = student[keep], teacher[keep]
        student = student.reshape(student.shape[0], -1)
        return self.loss(
            self.projection(student.float()),
            teacher.float(),
            torch.ones(student.shape[0], dtype=torch.bool, device=student.device),
        )

    def params_used(self, probe) -> list[nn.Parameter]:
        """Student parameters this stage's loss reaches (its gradient on ``probe`` is non-zero)."""
        self.model.zero_grad(set_to_none=True)
        self.step(probe).total.backward()
        used = [p for p in self.model.parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        self.model.zero_grad(set_to_none=True)
        return used
