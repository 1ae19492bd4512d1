"""The host kernel alone against reading the same logits at all, side by side in one run.

Method: a batch of synthetic logits as the teacher's head returns them (``--positions`` rows of V float32, 264 MiB
by default, so the rows come from DRAM as in the pipeline), split over the cores as the pipeline splits them.
Three passes over the same rows, interleaved ``--rounds`` times, each the best of ``--repeats``:
- read: a plain vectorised sum of every row, the least any pass over the logits can cost;
- scan: the kernel's one loop per row (group maxima and the log-partition's sum, ``_scan_row``);
- kernel: ``topk_log_probs`` whole (the scan, the threshold, the candidates, their sort, the float64 log-probs).
Printed: microseconds per position and the kernel's ratio to the read. ``--logits`` picks the rows: normal
(N(0, 3^2), distinct values), quantised (the same rounded to steps of 1/2, as a teacher with quantised output
gives: many ties at the top-k's edge), constant (every logit equal, the most ties there can be) and masked (all
but the first 1,000 ids at -inf, a restricted vocabulary: fewer finite groups than k, ties at -inf).

    python benchmarks/topk_kernel_speed.py                    # V = 50,257 and 262,144, k = 32
    python benchmarks/topk_kernel_speed.py --vocab 50257 --logits normal quantised constant masked
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit

from stages import topk_kernel


@njit(nogil=True, fastmath=topk_kernel._FAST)
def _read(z, rows, out):
    for i in range(rows.shape[0]):
        row = z[rows[i]]
        total = np.float32(0.0)
        for j in range(row.shape[0]):
            total += row[j]
        out[i] = total


@njit(nogil=True, fastmath=topk_kernel._FAST)
def _scan(z, rows, out):
    gmax = np.empty((z.shape[1] + topk_kernel._GROUP - 1) // topk_kernel._GROUP, np.float32)
    for i in range(rows.shape[0]):
        _, total = topk_kernel._scan_row(z[rows[i]], np.float32(1.4426950408889634), gmax)
        out[i] = total


def _best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def logits(kind: str, positions: int, vocab: int) -> np.ndarray:
    z = (np.random.default_rng(0).standard_normal((positions, vocab)) * 3).astype(np.float32)
    if kind == "quantised":
        z = np.round(z * 2) / 2
    elif kind == "constant":
        z[:] = 1.0
    elif kind == "masked":
        z[:, 1000:] = -np.inf
    return z


def measure(z: np.ndarray, k: int, rounds: int, repeats: int) -> dict[str, list[float]]:
    positions = len(z)
    rows = np.arange(positions)
    out = np.empty(positions)
    passes = {
        "read": lambda: topk_kernel._parallel(_read, z, rows, (), [out]),
        "scan": lambda: topk_kernel._parallel(_scan, z, rows, (), [out]),
        "kernel": lambda: topk_kernel.topk_log_probs(z, rows, k, 1.0),
    }
    for run in passes.values():  # compile and warm
        run()
    seen: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run in passes.items():
            seen[name].append(1e6 * _best(run, repeats) / positions)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[50257, 262144])
    p.add_argument("--mib", type=int, default=264, help="MiB of logits per batch (rows = MiB / (4 V))")
    p.add_argument("--logits", nargs="+", default=["normal"], choices=["normal", "quantised", "constant", "masked"])
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(
        f"threads: {topk_kernel._threads()}; us per position, median of {args.rounds} rounds (each best of "
        f"{args.repeats})"
    )
    print(
        f"{'V':>8} {'logits':>10} {'rows':>6} {'read':>7} {'scan':>7} {'kernel':>7} {'kernel / read':>14}  "
        "per-round kernel / read"
    )
    for vocab in args.vocab:
        positions = max(8, (args.mib << 20) // (4 * vocab))
        for kind in args.logits:
            seen = measure(logits(kind, positions, vocab), args.top_k, args.rounds, args.repeats)
            med = {name: float(np.median(v)) for name, v in seen.items()}
            per_round = ", ".join(f"{k / r:.2f}" for k, r in zip(seen["kernel"], seen["read"]))
            print(
                f"{vocab:>8} {kind:>10} {positions:>6} {med['read']:>7.2f} {med['scan']:>7.2f} {med['kernel']:>7.2f} "
                f"{med['kernel'] / med['read']:>14.2f}  {per_round}"
            )


if __name__ == "__main__":
    main()
