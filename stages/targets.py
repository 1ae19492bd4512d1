"""Pure math of soft targets: temperature, top-k, top-p lengths, log-partition, tail mass, fidelity.

Everything here works on plain tensors and touches no files, so it is tested alone (tests/test_targets.py).

Notation, per position: teacher logits z (vocabulary V), temperature T, log-partition
``logZ = logsumexp(z / T)``, log-probabilities ``log p_i = z_i / T - logZ`` under the FULL-vocabulary
softmax. The cache keeps the k largest ``log p_i`` with their ids and ``logZ``; the tail mass
``tau = 1 - sum_topk p_i`` is what the cached ids miss. Because the log-probabilities are normalised over
the whole vocabulary (not renormalised within the top-k), nothing is lost: the student's loss can treat
the tail as one extra bucket, and ``z_i = T * (log p_i + logZ)`` recovers the raw top-k logits exactly,
which is what re-tempering at another T needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def topk_log_probs(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids and full-vocabulary log-probabilities at ``temperature``: the definition the cache writer's
    kernel (``stages.topk_kernel``) is held to, and what the losses' tests build targets with.

    Args:
        logits: [N, V] teacher logits (any float dtype; computed in fp32; not modified).
        k: how many ids to keep, 1 <= k <= V.
        temperature: T > 0.

    Returns:
        ids [N, k] int64 sorted by descending probability, logp [N, k] float32, logz [N] float32.
    """
    z = logits.float()
    values, ids = torch.topk(z, k, dim=-1, sorted=True)
    # logZ = max/T + log(sum(exp((z - max)/T))). The top-1 value is the row max, so the separate max pass
    # that torch.logsumexp makes is saved.
    row_max = values[:, :1]
    shifted = z - row_max if z is logits else z.sub_(row_max)  # a converted copy may be overwritten
    if temperature != 1.0:  # x * 1.0 == x exactly: at T = 1 the pass is skipped with no change in the result
        shifted.mul_(1.0 / temperature)
    sum_exp = shifted.exp_().sum(dim=-1)
    logz = row_max.squeeze(-1) / temperature + sum_exp.log()
    logp = values / temperature - logz.unsqueeze(-1)
    return ids, logp, logz


def tail_mass(logp: Tensor, vocab_size: int, valid: Tensor | None = None) -> Tensor:
    """Probability mass outside the cached ids: ``1 - sum exp(logp)``, in [0, 1].

    Computed as ``-expm1(logsumexp(logp))`` so a tiny tail keeps its relative precision. When the cache
    holds the whole vocabulary (k == V) the tail is 0 by definition, not a rounding residue. This is the one
    place the formula is written: the cache writer and the losses (``SoftTargets.tail``) both call it.

    Args:
        logp: [..., k] full-vocabulary log-probabilities.
        valid: [..., k] bool, the slots that hold an id (a top-p cache keeps a prefix per position; the other
            slots are padding and count as probability 0), or None for all of them.
    Returns:
        [...] in the dtype of ``logp`` upcast to at least float32 (float64 stays float64, for gradcheck).
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    if valid is None:
        if logp.shape[-1] >= vocab_size:
            return torch.zeros(logp.shape[:-1], dtype=dtype, device=logp.device)
        return (-torch.expm1(torch.logsumexp(logp.to(dtype), dim=-1))).clamp(0.0, 1.0)
    # exp(-inf) = 0: the padding adds nothing to the sum, so the tail stays exact row by row.
    tail = (-torch.expm1(torch.logsumexp(logp.to(dtype).masked_fill(~valid, -math.inf), dim=-1))).clamp(0.0, 1.0)
    return tail.masked_fill(valid.sum(dim=-1) >= vocab_size, 0.0)


def top_p_lengths(logp: Tensor, p: float, min_k: int) -> Tensor:
    """How many of each row's ids a top-p cache keeps: the smallest prefix whose probability reaches ``p``,
    at least ``min_k`` and at most all k of them (a top-k whose whole mass is below ``p`` is kept whole).

    Args:
        logp: [N, k] full-vocabulary log-probabilities by descending probability; p in (0, 1]; 1 <= min_k <= k.
    Returns:
        [N] int64 in [min_k, k].
    """
    # float64: a float32 running sum drifts by ~k ulps, which would move prefixes whose mass is near p.
    cumulative = logp.double().exp().cumsum(dim=-1)
    # The sums are non-decreasing, so the prefixes below p are the first ones; one more id reaches p.
    return ((cumulative < p).sum(dim=-1) + 1).clamp(min_k, logp.shape[-1])


def tail_mass_array(logp: np.ndarray, vocab_size: int, valid: np.ndarray | None = None) -> np.ndarray:
    """``tail_mass`` for the cache writer's numpy arrays: the same formula and ``valid`` mask, in float64,
    returned as float32. logp [N, k] -> [N]. NaN rows give NaN (the writer reports them).
    """
    kept = np.full(logp.shape[:-1], logp.shape[-1]) if valid is None else valid.sum(-1)
    x = logp.astype(np.float64)
    if valid is not None:
        x = np.where(valid, x, -np.inf)  # padding adds probability 0
    top = x.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        lse = top[..., 0] + np.log(np.exp(x - top).sum(axis=-1))
    tail = np.clip(-np.expm1(lse), 0.0, 1.0)
    return np.where(kept >= vocab_size, 0.0, tail).astype(np.float32)  # every id cached: 0, not a rounding residue


def entropy(logits: Tensor, temperature: float) -> Tensor:
    """Entropy (nats) of softmax(logits / T) over the full vocabulary. logits [N, V] -> [N]."""
    logq = _log_softmax(logits, temperature)
    return -logq.exp().mul_(logq).sum(dim=-1)  # in place: two [N, V] temporaries at a time


def reconstruct_log_probs(ids: Tensor, logp: Tensor, vocab_size: int, valid: Tensor | None = None) -> Tensor:
    """The dense distribution a cache entry stands for: top-k exact, tail spread uniformly.

    Args:
        ids: [N, k] int64; logp: [N, k] full-vocabulary log-probabilities.
        valid: [N, k] bool, the slots that hold an id (a top-p cache's prefix), or None for all.
    Returns:
        [N, V] float32 log-probabilities (each row sums to 1). With k == V it equals the teacher's exactly.
    """
    logp = logp.float()
    n, k = logp.shape
    tau = tail_mass(logp, vocab_size, valid)
    kept = torch.full((n,), k) if valid is None else valid.sum(-1)
    # log(0) = -inf where no id is uncached (and the tail is 0 by definition).
    fill = torch.log(tau / (vocab_size - kept).clamp(min=1)).masked_fill(kept >= vocab_size, -math.inf)
    dense = fill.unsqueeze(-1).expand(n, vocab_size).clone()
    if valid is not None:  # a padding slot writes its position's top-1 again instead of id 0
        ids, logp = torch.where(valid, ids, ids[:, :1]), torch.where(valid, logp, logp[:, :1])
    dense.scatter_(1, ids.long(), logp)
    return dense


def cache_fidelity_kl(
    logits: Tensor, temperature: float, ids: Tensor, logp: Tensor, valid: Tensor | None = None
) -> Tensor:
    """KL(teacher dense at T || distribution reconstructed from the cache), per position, in nats.

    This is the information the cache loses: 0 when k == V, small when the tail is small.
    logits [N, V] -> [N]; ``valid`` as in ``reconstruct_log_probs``.
    """
    vocab_size = logits.shape[-1]
    log_teacher = _log_softmax(logits, temperature)
    # p * (log_teacher - log_cached), in place so that two [N, V] temporaries live at a time, not six.
    terms = reconstruct_log_probs(ids, logp, vocab_size, valid).neg_().add_(log_teacher)
    p = log_teacher.exp_()
    # Where the teacher gives an id zero mass the term is 0 whatever the cache says; xlogy-style guard.
    return terms.mul_(p).masked_fill_(~(p > 0), 0.0).sum(dim=-1).clamp_min(0.0)


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) in fp32; x / 1.0 == x, so at T = 1 the division (a [N, V] copy) is skipped."""
    z = logits.float()
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def hashed_uniforms(keys: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Uniforms in [0, 1) [N, draws], a pure function of (seed, key, draw): splitmix64 over a counter.

    Sampled targets use them so the draws for a position never depend on how positions were batched, which
    keeps a resumed or re-batched cache identical to a fresh one.
    """
    with np.errstate(over="ignore"):
        x = (keys.astype(np.uint64)[:, None] * np.uint64(draws) + np.arange(draws, dtype=np.uint64)[None, :]) * _GOLDEN
        x += np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_counts(logits: Tensor, temperature: float, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Draw ids from softmax(logits / T) by inverse CDF; return them deduplicated with their counts.

    Args:
        logits: [N, V]; uniforms: [N, D] float64 in [0, 1), one per draw.
    Returns:
        ids [N, D] int64 and counts [N, D] int64: the distinct drawn ids of each row left-aligned in
        ascending order, with how often each was drawn; slots past a row's distinct ids have count 0.
        ``counts / D`` is an unbiased estimate of the teacher's distribution (Anshumann et al., 2025).
    """
    n, d = uniforms.shape
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum_(dim=-1)
    drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1:]).contiguous(), right=True).clamp_(max=logits.shape[-1] - 1)
    drawn = drawn.sort(dim=-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = first.cumsum(dim=-1) - 1  # index of each draw's distinct id within its row
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    ids = torch.zeros_like(drawn).scatter_(1, slot, drawn)
    return ids, counts
