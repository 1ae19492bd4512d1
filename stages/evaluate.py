"""Held-out evaluation of a student: accuracy or perplexity, and, where the eval set has a cache, the
top-1 agreement with the teacher and the KL to it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stages.loader import IGNORE, Batch
from stages.losses import KDLoss, SoftTargets


def flatten(batch: Batch, logits: Tensor, vocab: int | None) -> tuple[Tensor, Tensor, Tensor, list[dict[str, Tensor]]]:
    """Positions that carry targets, as flat rows: logits [N, V], labels [N], mask [N], targets with [N, ..].

    A classifier batch is already flat (N = B). A token batch keeps only its real positions, so the losses
    never spend work on padding. ``vocab`` truncates a padded student vocabulary to the teacher's.
    """
    if vocab is not None:
        logits = logits[..., :vocab]
    if logits.dim() == 2:
        return logits, batch.labels, batch.mask, batch.targets
    keep = batch.mask.reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1])[keep]
    targets = [{k: v.reshape(-1, *v.shape[2:])[keep] for k, v in t.items()} for t in batch.targets]
    return flat_logits, batch.labels.reshape(-1)[keep], torch.ones(int(keep.sum()), dtype=torch.bool), targets


def soft_targets(t: dict[str, Tensor], temperature: float, vocab_size: int) -> SoftTargets:
    return SoftTargets(t["ids"], t["logp"], t["logz"], temperature, vocab_size)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    teacher: tuple[float, int] | None,
    *,
    device: torch.device,
    token_level: bool,
    vocab: int | None,
) -> dict[str, float]:
    """Metrics over a whole loader. ``teacher`` = (T, V) of the eval cache, or None when there is none."""
    model.eval()
    kl_loss = KDLoss(alpha=1.0, temperature=teacher[0]) if teacher else None
    ce_sum = correct = labelled = agree = kl_sum = positions = 0.0
    for batch in loader:
        batch = to_device(batch, device)
        logits, labels, mask, targets = flatten(batch, model(batch.inputs).logits, vocab)
        logits = logits.float()
        has = labels != IGNORE
        labelled += float(has.sum())
        if token_level:
            ce = torch.logsumexp(logits[has], -1) - logits[has].gather(-1, labels[has].unsqueeze(-1)).squeeze(-1)
            ce_sum += float(ce.sum())
        else:
            correct += float((logits.argmax(-1)[has] == labels[has]).sum())
        if teacher is not None:
            t = soft_targets(targets[0], *teacher)
            agree += float((logits.argmax(-1) == t.ids[:, 0]).sum())
            n = int(mask.sum())
            kl_sum += kl_loss(logits, t, labels, mask).parts["kd"] * n
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


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return Batch(
        {k: move(v) for k, v in batch.inputs.items()},
        move(batch.labels),
        move(batch.mask),
        [{k: move(v) for k, v in t.items()} for t in batch.targets],
        batch.ids,
    )
