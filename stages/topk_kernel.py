"""The cache's targets in one pass over the logits: top-k, the log-partition and the probe's statistics (CPU).

The definitions are the torch functions of ``stages.targets`` (``topk_log_probs``, ``entropy``,
``cache_fidelity_kl``); this module computes the same quantities the way a CPU computes them fastest, and the
tests hold it to those definitions. Why a kernel: the teacher's logits are ``[positions, V]`` float32, far
larger than the caches, so each pass over them is a trip to main memory; torch's ``topk`` plus a log-sum-exp made
five (topk, max, subtract, exp, sum) and cost about a quarter of a small teacher's time (benchmarks/README.md).

Here each row is read from memory once: one loop takes the maxima of its groups of ``_GROUP`` logits and, at
the same time, their exponentials against the maximum of the logits before them; when a chunk raises the row's
maximum, the sum so far is rescaled, as in an online softmax (``_scan_row``). A threshold that at least k group
maxima reach bounds the top-k from below (those maxima are logits), so the top-k is chosen among the few groups
that reach it, re-read from cache; where many maxima reach it (ties), only the first k of the logits tied at
the top-k's edge are taken, so a constant row costs about what any other does. Exponentials use
``exp(x) = 2^n * 2^f`` with a polynomial for ``2^f``, which the compiler vectorises (libm's ``exp`` does not
vectorise here); its relative error is 2.2e-7 at most, and the sum is kept in float64, so logZ is within float32
rounding of a float64 reference (tests/test_topk_kernel.py).

Ties between equal logits go to the lower id (torch's ``topk`` leaves their order unspecified). A row with a
NaN or +inf logit gets a NaN log-partition, which the caller reports.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_GROUP = 64  # logits per group: 4 AVX-512 registers; smaller groups cost more maxima, larger more candidates
_CHUNK = 1024  # exponentials summed in float32 before the float64 total: ~1e-7 relative, and vectorised
# Floating-point reassociation lets the compiler split sums and maxima across vector lanes; no "nnan"/"ninf":
# a NaN or infinity in the logits must reach the log-partition so the row is reported, not hidden.
_FAST = {"reassoc", "contract", "arcp", "nsz"}
_LOG2E = 1.4426950408889634
_LOWEST = np.float32(np.finfo(np.float32).min)  # the most negative finite float32


def _exp2_coefficients(degree: int = 5) -> list[np.float32]:
    """Polynomial coefficients (constant first) of 2^f on |f| <= 1/2: a least-squares fit at Chebyshev nodes, which
    is within a hair of the minimax polynomial. Degree 5: relative error 1.04e-7, below a float32 rounding, and
    one multiply-add fewer than the degree-6 Taylor series of the same accuracy."""
    nodes = 0.5 * np.cos(np.pi * (np.arange(64) + 0.5) / 64)
    fit = np.polynomial.Chebyshev.fit(nodes, np.exp2(nodes), degree, domain=[-0.5, 0.5])
    return [np.float32(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef]


_C0, _C1, _C2, _C3, _C4, _C5 = _exp2_coefficients()


@intrinsic
def _float_from_bits(typingctx, bits):
    """An int32's bits read as a float32 (2^n from its exponent field), which vectorises unlike ``math.ldexp``."""
    signature = types.float32(types.int32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def _bits_from_float(typingctx, x):
    """A float32's bits as an int32."""
    signature = types.int32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


@intrinsic
def _rint(typingctx, x):
    """LLVM's rint: the nearest integer (ties to even), one vector instruction (vrndscaleps)."""
    signature = types.float32(types.float32)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.rint.f32"), args)

    return signature, codegen


_EXPONENT_BIAS = np.float32(12582912.0 + 127.0)  # 1.5 * 2^23 + 127: n + this holds n + 127 in its low bits


@njit(inline="always", fastmath=_FAST)
def _exp2(t):
    """2^t for float32 t <= 127 (NaN stays NaN). Below -126 it returns 2^-126: such a term is < 1e-38 of the
    row's largest, which contributes about 1. t = n + f with n = rint(t), |f| <= 1/2; 2^n is built in the
    exponent field from the bits of n + 1.5 * 2^23 + 127 (an add and a shift instead of two conversions)."""
    u = t if not (t < np.float32(-126.0)) else np.float32(-126.0)
    n = _rint(u)
    f = u - n
    p = _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _C1
    p = p * f + _C0
    return p * _float_from_bits(_bits_from_float(n + _EXPONENT_BIAS) << 23)


@intrinsic
def _maxnum(typingctx, a, b):
    """LLVM's maxnum: the larger of two float32, a NaN ignored. Unlike a compare and select (numba's ``max``),
    a reduction over it vectorises: 12x faster over a row (measured)."""
    signature = types.float32(types.float32, types.float32)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f32"), args)

    return signature, codegen


@intrinsic
def _maxnum_vector(typingctx, a, b):
    """_maxnum flagged ``nnan``, so LLVM vectorises it in a loop that also sums (without the flag it does not: 13x
    slower, measured). The flag makes a NaN operand's result undefined (on x86: one of the two operands); its
    only use is the group maxima, and a row holding a NaN is reported by its NaN sum, never by its maxima."""
    signature = types.float32(types.float32, types.float32)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f32")
        return builder.call(function, args, fastmath=("nnan",))

    return signature, codegen


@njit(inline="always", fastmath=_FAST)
def _group_max(group):
    """The maximum of _GROUP logits (NaN ignored)."""
    m = np.float32(-np.inf)
    for j in range(_GROUP):
        m = _maxnum(m, group[j])
    return m


@njit(inline="always", fastmath=_FAST)
def _exp2_chunk(chunk, n, m, scale):
    """sum(2^((chunk[:n] - m) * scale)) in float32."""
    part = np.float32(0.0)
    for j in range(n):
        part += _exp2((chunk[j] - m) * scale)
    return part


@njit(inline="always", fastmath=_FAST)
def _sum_exp2(row, m, scale):
    """sum(2^((row - m) * scale)) in float64 (m: the row's maximum, so every power is <= 1), over float32
    partial sums of _CHUNK terms. Each chunk is a slice with a loop of its own length: with a bound like
    min(lo + _CHUNK, V) on a loop over the row the compiler does not vectorise it (3.5x slower, measured)."""
    v = row.shape[0]
    full = v // _CHUNK
    total = 0.0
    for q in range(full):
        total += _exp2_chunk(row[q * _CHUNK : (q + 1) * _CHUNK], _CHUNK, m, scale)
    return total + _exp2_chunk(row[full * _CHUNK :], v - full * _CHUNK, m, scale)


@njit(inline="always", fastmath=_FAST)
def _tail_chunk(chunk, n, m, scale, c, below):
    """_tail_terms over chunk[:n] in float32: (sum x 2^x, the same and sum 2^x where chunk < below, ties)."""
    part, part_tail, part_p, ties = np.float32(0.0), np.float32(0.0), np.float32(0.0), 0
    for j in range(n):
        x = (chunk[j] - m) * scale - c
        p = _exp2(x)
        low = np.float32(chunk[j] < below)  # 0 or 1: a product, not a branch, so the loop vectorises
        part += p * x
        part_tail += p * x * low
        part_p += p * low
        ties += np.int64(chunk[j] == below)
    return part, part_tail, part_p, ties


@njit(inline="always", fastmath=_FAST)
def _tail_terms(row, m, scale, c, below):
    """With x = (row - m) * scale - c (log2 p when c = log2 of _sum_exp2): (sum of x 2^x over the row, the same
    and the sum of 2^x over the logits below ``below``, how many logits equal ``below``), as _sum_exp2 sums.
    The tail's sums are taken over the tail itself, not as the whole less the top-k, which would cancel."""
    v = row.shape[0]
    full = v // _CHUNK
    total, tail, tail_p, ties = 0.0, 0.0, 0.0, 0
    for q in range(full):
        a, b, d, e = _tail_chunk(row[q * _CHUNK : (q + 1) * _CHUNK], _CHUNK, m, scale, c, below)
        total, tail, tail_p, ties = total + a, tail + b, tail_p + d, ties + e
    a, b, d, e = _tail_chunk(row[full * _CHUNK :], v - full * _CHUNK, m, scale, c, below)
    return total + a, tail + b, tail_p + d, ties + e


@njit(inline="always", fastmath=_FAST)
def _count_at_least(values, t):
    n = 0
    for j in range(values.shape[0]):
        n += values[j] >= t
    return n


@njit(inline="always", fastmath=_FAST)
def _threshold(gmax, k, m):
    """A value that at least k of the group maxima reach, and few more than k: no top-k logit lies below it (the
    k maxima reaching it are logits). Found by widening a window below the row's maximum m, then bisecting it;
    each step is one vectorised count. -inf when fewer than k groups have a finite maximum."""
    if _count_at_least(gmax, _LOWEST) < k or not np.isfinite(m):  # too few finite maxima, or an infinite one
        return np.float32(-np.inf)
    hi, span = m, np.float32(1.0)
    lo = m - span
    while _count_at_least(gmax, lo) < k:  # below lo: at least k maxima reach it
        hi, span = lo, span * np.float32(2.0)
        lo = m - span
        if not np.isfinite(lo):
            return np.float32(-np.inf)
    for _ in range(12):  # the window to 1/4096 of its width: the candidates stay within a few of k
        mid = lo + (hi - lo) * np.float32(0.5)
        if mid <= lo or mid >= hi:
            break
        if _count_at_least(gmax, mid) >= k:
            lo = mid
        else:
            hi = mid
    return lo


@njit(inline="always", fastmath=_FAST)
def _candidates(row, gmax, thr, cand_v, cand_i):
    """The logits >= thr (values and ids, ascending ids) into cand_v/cand_i, from the groups whose maximum
    reaches thr; how many."""
    v = row.shape[0]
    n = 0
    for g in range(gmax.shape[0]):
        if gmax[g] >= thr:
            for j in range(g * _GROUP, min(g * _GROUP + _GROUP, v)):
                if row[j] >= thr:
                    cand_v[n] = row[j]
                    cand_i[n] = j
                    n += 1
    return n


@njit(inline="always", fastmath=_FAST)
def _tied_candidates(row, gmax, thr, k, cand_v, cand_i):
    """_candidates when many group maxima reach thr, which ties do (a constant row, quantised or masked logits):
    thr is raised to the least of those maxima (the same maxima reach it, and it is a logit), and of the logits
    equal to it only the first k are taken, the most the top-k can hold (ties go to the lower id). A constant
    row then gives k candidates, not V to sort."""
    t = np.float32(np.inf)
    for g in range(gmax.shape[0]):
        x = gmax[g]
        t = x if x >= thr and x < t else t
    v = row.shape[0]
    n = ties = 0
    for g in range(gmax.shape[0]):
        if gmax[g] > t or (gmax[g] == t and ties < k):  # a group whose maximum is t adds only ties
            for j in range(g * _GROUP, min(g * _GROUP + _GROUP, v)):
                x = row[j]
                tie = x == t
                if x > t or (tie and ties < k):
                    cand_v[n] = x
                    cand_i[n] = j
                    n += 1
                    ties += tie
    return n


@njit(inline="always", fastmath=_FAST)
def _group_max_exp(group, ref, scale):
    """Over _GROUP logits, read once: their maximum and sum(2^((group - ref) * scale)) in float32. Both in one loop,
    so the exponentials are computed while the next logits stream in from memory (a 50,257-logit row from DRAM in
    10.6 us against 15.6 us for a pass for the maxima and another for the sum, one thread, measured). A NaN may or
    may not win the maximum here; the sum keeps it."""
    gm = np.float32(-np.inf)
    part = np.float32(0.0)
    for j in range(_GROUP):
        x = group[j]
        gm = _maxnum_vector(gm, x)
        part += _exp2((x - ref) * scale)
    return gm, part


@njit(inline="always", fastmath=_FAST)
def _has_nan(values):
    n = 0
    for j in range(values.shape[0]):
        n += values[j] != values[j]
    return n > 0


@njit(inline="always", fastmath=_FAST)
def _scan_row(row, scale, gmax):
    """One read of a row from memory: its group maxima (into gmax), its maximum m, and the sum of
    2^((z - m) * scale) in float64.

    Chunk by chunk (_CHUNK logits), each term is taken against the maximum of the chunks before it, the reference
    r: a term is then 2^t with t <= (chunk max - r) * scale, and the chunk's sum is kept when that bound is <= 1/2
    (t is then as precise as against the true maximum). Otherwise the chunk, now in L1, is summed again against
    its own maximum. The total is rescaled whenever the maximum rises."""
    v = row.shape[0]
    full = v // _GROUP
    per_chunk = _CHUNK // _GROUP
    m = _group_max(row[:_GROUP]) if full > 0 else np.float32(-np.inf)  # the first reference
    total = 0.0
    for g in range(0, full, per_chunk):
        end = min(g + per_chunk, full)
        cm, part = np.float32(-np.inf), np.float32(0.0)
        for q in range(g, end):
            gm, p = _group_max_exp(row[q * _GROUP : (q + 1) * _GROUP], m, scale)
            gmax[q] = gm
            cm = _maxnum(cm, gm)
            part += p
        chunk = row[g * _GROUP : end * _GROUP]
        if cm > m:
            if (cm - m) * scale <= np.float32(0.5):
                total = (total + part) * math.exp2((float(m) - float(cm)) * float(scale))
            else:  # summed against too low a reference (or the chunk holds +inf, which gives NaN, as it should)
                part = _exp2_chunk(chunk, chunk.shape[0], cm, scale)
                total = total * math.exp2((float(m) - float(cm)) * float(scale)) + part  # 0 (or NaN) * 0 at m = -inf
            m = cm
        elif m > -np.inf:
            total += part
        elif _has_nan(chunk):  # every logit so far is -inf (probability 0; their terms would be -inf - -inf)
            total = np.nan
    if full * _GROUP < v:  # the last, partial group
        rest = row[full * _GROUP :]
        gm = np.float32(-np.inf)
        for j in range(rest.shape[0]):
            gm = _maxnum(gm, rest[j])
        gmax[full] = gm
        if gm > m:
            total *= math.exp2((float(m) - float(gm)) * float(scale))
            m = gm
        if m > -np.inf:
            total += _exp2_chunk(rest, rest.shape[0], m, scale)
        elif _has_nan(rest):
            total = np.nan
    return m, total


@njit(nogil=True, cache=True, fastmath=_FAST)
def _topk_rows(z, rows, k, scale, ids, vals, maxes, sums):
    """For each ``rows[i]`` of ``z``: top-k ids and logits (descending, ties by id), max and sum of exponentials."""
    v = z.shape[1]
    groups = (v + _GROUP - 1) // _GROUP
    gmax = np.empty(groups, np.float32)
    cand_v = np.empty(v, np.float32)
    cand_i = np.empty(v, np.int64)
    for i in range(rows.shape[0]):
        row = z[rows[i]]
        m, total = _scan_row(row, scale, gmax)  # the one read from memory; the passes below find it in cache
        maxes[i] = m
        sums[i] = total
        thr = np.float32(-np.inf) if k >= groups else _threshold(gmax, k, m)
        if _count_at_least(gmax, thr) > 2 * k:
            n = _tied_candidates(row, gmax, thr, k, cand_v, cand_i)
        else:
            n = _candidates(row, gmax, thr, cand_v, cand_i)
        order = np.argsort(-cand_v[:n], kind="mergesort")  # stable: equal logits keep ascending ids
        for t in range(k):
            if t < n:
                ids[i, t] = cand_i[order[t]]
                vals[i, t] = cand_v[order[t]]
            else:  # fewer candidates than k only when NaNs fill the row; its NaN logZ reports it
                ids[i, t] = 0
                vals[i, t] = np.nan


@njit(nogil=True, cache=True, fastmath=_FAST)
def _plogp_rows(z, rows, scale, ids, kept, out):
    """For each row, with log2 p = (z - max) * scale - log2(sum of 2^((z - max) * scale)) and the cache keeping
    the first kept[i] of ``ids`` (ids[i, 0] the largest logit): out[i] = (sum of p log2 p over the vocabulary,
    the same over the ids not kept, their total p). The normaliser is summed again here, in float64: recovering
    it from the stored float32 logZ would shift every log p by logZ's rounding (~4e-6 at logZ ~ 40)."""
    for i in range(rows.shape[0]):
        row = z[rows[i]]
        k = kept[i]
        m, kth = row[ids[i, 0]], row[ids[i, k - 1]]
        c = np.float32(math.log2(_sum_exp2(row, m, scale)))
        total, tail, tail_p, ties = _tail_terms(row, m, scale, c, kth)
        for t in range(k):  # logits equal to the k-th that the top-k did not keep are in the tail too
            ties -= row[ids[i, t]] == kth
        x = (kth - m) * scale - c
        p = _exp2(x)
        out[i, 0] = total
        out[i, 1] = tail + ties * np.float64(p * x)
        out[i, 2] = tail_p + ties * np.float64(p)


_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parallel(kernel, logits: np.ndarray, rows: np.ndarray, constants: tuple, per_row: list[np.ndarray]) -> None:
    """``kernel(logits, rows, *constants, *per_row)`` with the rows (and the per-row arrays, outputs included)
    split into contiguous parts, one per core; the kernels release the GIL."""
    global _pool
    threads = min(_threads(), max(1, len(rows) // 4))  # a few rows per thread at least, or the split costs more
    if threads == 1:
        kernel(logits, rows, *constants, *per_row)
        return
    if _pool is None or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="topk")
    bounds = np.linspace(0, len(rows), threads + 1).astype(int)
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    futures = [_pool.submit(kernel, logits, rows[p], *constants, *(a[p] for a in per_row)) for p in parts]
    for f in futures:
        f.result()


def topk_log_probs(logits: np.ndarray, rows: np.ndarray, k: int, temperature: float):
    """Top-k ids and full-vocabulary log-probabilities at ``temperature`` of the given rows of ``logits``.

    Args:
        logits: [N, V] float32, C-contiguous; not modified.
        rows: [n] int64 indices into its rows (the real positions; padding is skipped, not copied).
        k: 1 <= k <= V. temperature: T > 0.
    Returns:
        ids [n, k] int64 by descending probability (ties by id), logp [n, k] float32, logz [n] float32, as
        ``stages.targets.topk_log_probs`` defines them; logZ is NaN where the row holds NaN or +inf.
    """
    n = len(rows)
    ids, vals = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    maxes, sums = np.empty(n, np.float32), np.empty(n, np.float64)
    scale = np.float32(_LOG2E / temperature)  # exponentials in base 2: z * log2(e) / T
    _parallel(_topk_rows, logits, np.ascontiguousarray(rows, np.int64), (k, scale), [ids, vals, maxes, sums])
    with np.errstate(invalid="ignore", divide="ignore"):
        logz = maxes.astype(np.float64) / temperature + np.log(sums)
        logp = vals.astype(np.float64) / temperature - logz[:, None]
    return ids, logp.astype(np.float32), logz.astype(np.float32)


def dense_statistics(
    logits: np.ndarray,
    rows: np.ndarray,
    temperature: float,
    ids: np.ndarray,
    tail: np.ndarray,
    kept: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The fidelity probe's entropy and KL of the given rows, as ``stages.targets.entropy`` and
    ``cache_fidelity_kl`` define them, from one more read of each row.

    With x = log p (T, the full vocabulary): entropy = -sum p x; the cache stands for its top-k exactly and the
    stored tail mass tau spread over the V - k other ids, so KL = sum over the other ids of p (x - log(tau / (V - k))).
    A row whose stored tail rounds to 0 (float32 log-probs of a near-certain top-k) gets KL 0 rather than an
    infinity for the ~1e-8 of mass the reconstruction cannot place.

    Args:
        ids [n, k], tail [n]: the top-k ``topk_log_probs`` gave for these rows, and their stored tail mass.
        kept [n]: how many of the ids the cache keeps (a top-p cache's prefix); None: all k.
    Returns:
        entropy [n], kl [n] float64 (nats).
    """
    n, v = len(rows), logits.shape[1]
    k = np.full(n, ids.shape[1], np.int64) if kept is None else np.asarray(kept, np.int64)
    out = np.empty((n, 3), np.float64)
    scale = np.float32(_LOG2E / temperature)
    rows = np.ascontiguousarray(rows, np.int64)
    _parallel(_plogp_rows, logits, rows, (scale,), [np.ascontiguousarray(ids), k, out])
    ln2 = math.log(2)
    entropy = -out[:, 0] * ln2
    tau = tail.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(tau > 0, np.log(tau / np.maximum(v - k, 1)), 0.0)
    kl = np.where((tau > 0) & (k < v), out[:, 1] * ln2 - out[:, 2] * spread, 0.0)
    return entropy, np.maximum(kl, 0.0)


def warm_up() -> None:
    """Load (or, the first time on a machine, compile: ~10 s) both kernels; numba caches the machine code beside
    this module. Loading takes ~0.5 s, which cache-teacher spends while ONNX Runtime builds the session."""
    logits = np.zeros((2, 3), np.float32)
    ids, _, _ = topk_log_probs(logits, np.arange(2), 1, 1.0)
    dense_statistics(logits, np.arange(2), 1.0, ids, np.zeros(2, np.float32))
