"""Held-out evaluation of a student: accuracy or perplexity, and, where the eval set has a cache, the
top-1 agreement with the teacher and the KL to it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stages.loader import Batch
from stages.losses import IGNORE_INDEX, KDLoss, SampledTargets, SoftTargets


def flatten(
    batch: Batch, logits: Tensor, vocab: int | None
) -> tuple[Tensor, Tensor, Tensor, list[SoftTargets | SampledTargets]]:
    """Positions that carry targets, as flat rows: logits [N, V], labels [N], mask [N], targets over [N].

    A classifier batch is already flat (N = B). A token batch keeps only its real positions, so the losses
    never spend work on padding. ``vocab`` truncates a padded student vocabulary to the teacher's.
    """
    if vocab is not None:
        logits = logits[..., :vocab]
    if logits.dim() == 2:
        return logits, batch.labels, batch.mask, batch.targets
    keep = batch.mask
    every = torch.ones(int(keep.sum()), dtype=torch.bool, device=keep.device)
    return logits[keep], batch.labels[keep], every, [t.index(keep) for t in batch.targets]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, *, device: torch.device, token_level: bool, vocab: int | None
) -> dict[str, float]:
    """Metrics over a whole loader; agreement and KL when its batches carry a teacher's top-k targets."""
    model.eval()
    ce_sum = correct = labelled = agree = kl_sum = positions = 0.0
    for batch in loader:
        batch = batch.to(device)
        logits, labels, mask, targets = flatten(batch, model(batch.inputs).logits, vocab)
        logits = logits.float()
        has = labels != IGNORE_INDEX
        labelled += float(has.sum())
        if token_level:
            ce = torch.logsumexp(logits[has], -1) - logits[has].gather(-1, labels[has].unsqueeze(-1)).squeeze(-1)
            ce_sum += float(ce.sum())
        else:
            correct += float((logits.argmax(-1)[has] == labels[has]).sum())
        if targets:
            t = targets[0]
            agree += float((logits.argmax(-1) == t.ids[:, 0]).sum())
            n = int(mask.sum())
            kl_sum += KDLoss(alpha=1.0, temperature=t.temperature)(logits, t, labels, mask).parts["kd"] * n
            positions += n
    model.train()
    metrics: dict[str, float] = {}
    if token_level and labelled:
        metrics["perplexity"] = math.exp(ce_sum / labelled)
    elif labelled:
        metrics["accuracy"] = correct / labelled
    if positions:
        metrics["agreement"] = agree / positions
        metrics["kl"] = kl_sum / positions
    return metrics
