"""Distillation losses computed from cached soft targets.

One module per loss: ``kd`` (one teacher's top-k, and plain cross-entropy), ``ensemble`` (several teachers),
``sampled`` (ids drawn from the teacher), ``hidden`` (hidden-state matching); ``common`` holds what they share.

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

from stages.losses.common import (
    IGNORE_INDEX,
    LossOutput,
    SoftTargetLoss,
    SoftTargets,
    check_batch,
    masked_mean,
    retemper,
    sparse_kl,
)
from stages.losses.ensemble import EnsembleKDLoss, mixture
from stages.losses.hidden import HiddenStateLoss
from stages.losses.kd import KDLoss, cross_entropy_only
from stages.losses.sampled import SampledKDLoss, SampledTargets

__all__ = [
    "IGNORE_INDEX",
    "EnsembleKDLoss",
    "HiddenStateLoss",
    "KDLoss",
    "LossOutput",
    "SampledKDLoss",
    "SampledTargets",
    "SoftTargetLoss",
    "SoftTargets",
    "check_batch",
    "cross_entropy_only",
    "masked_mean",
    "mixture",
    "retemper",
    "sparse_kl",
]
