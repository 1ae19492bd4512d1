"""A causal-LM student's training step with sparse KD, divided by the same step with cross-entropy only.

Target: KD / CE <= 1.10, i.e. distilling from a top-k cache costs at most 10% more per step than training on
the labels alone. One model and one AdamW optimizer take full steps (forward, loss, backward, optimizer step)
for every variant, interleaved round by round, so drift in machine load hits all variants alike. Each step is
timed in process CPU time (all threads, user + system), which a busy shared machine disturbs far less than
wall time; wall time is printed beside it. A variant's ratio is the median over rounds of its step time over
the CE step of the same round. The soft targets are random but valid: top-k of random teacher logits
through ``stages.targets.topk_log_probs``, built once outside the timing.

It also times the loss alone (forward + backward of the loss on fixed logits), which is where KD and CE
differ; the rest of the step is the same model.

    python benchmarks/student_step.py    # V = 49,152 (SmolLM2's vocabulary), k = 8, 32, 64, +/- renormalize
    python benchmarks/student_step.py --vocab 262144 --batch 2 --ks 8,32 --no-renormalize --rounds 3
    # (at V = 262,144 each [N, V] float32 tensor of an 8 x 128 batch is 1 GiB; 2 x 128 keeps it at 256 MiB)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stages.losses import KDLoss, SoftTargets, cross_entropy_only
from stages.students import build_student, count_parameters
from stages.targets import topk_log_probs

STUDENT = "causal-lm:layers=2,d_model=256"
TARGET = 1.10  # the bound on KD step time / CE step time
LossFn = Callable[[torch.Tensor], torch.Tensor]  # student logits [N, V] -> scalar loss


def soft_targets(n: int, vocab: int, k: int, generator: torch.Generator) -> SoftTargets:
    """Top-k of random teacher logits at T = 1; the logits' scale (3) gives a peaked but non-trivial tail."""
    logits = 3.0 * torch.randn(n, vocab, generator=generator)
    ids, logp, logz = topk_log_probs(logits, k, temperature=1.0)
    return SoftTargets(ids, logp, logz, 1.0, vocab)


def timed(fn: Callable[[LossFn], None], loss_fn: LossFn) -> tuple[float, float]:
    """(CPU ms, wall ms) of ``fn(loss_fn)``. CPU time counts every thread, and the page faults of fresh tensors."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(loss_fn)
    return 1000 * (time.process_time() - cpu), 1000 * (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152, help="V: student outputs and teacher vocabulary")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (all real: N = batch * seq)")
    parser.add_argument("--ks", type=str, default="8,32,64", help="comma-separated top-k values to time")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; each round steps every variant once")
    parser.add_argument("--no-renormalize", action="store_true", help="skip the renormalize=True variants")
    parser.add_argument("--seed", type=int, default=0, help="weights, tokens and teacher logits")
    # One thread by default: on a shared machine more threads than free cores make torch's pool spin, which
    # inflates CPU time; the ratio is a ratio of work, which one thread measures cleanly.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vocab, n = args.vocab, args.batch * args.seq
    model = build_student(STUDENT, num_outputs=vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=generator)
    inputs = {"input_ids": tokens[:, :-1], "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.int64)}
    labels = tokens[:, 1:].reshape(-1)  # next-token labels; every position is real and labelled
    mask = torch.ones(n, dtype=torch.bool)

    losses: dict[str, LossFn] = {"ce": lambda x: cross_entropy_only(x, labels, mask).total}
    ks = [int(k) for k in args.ks.split(",")]
    for k in ks:
        targets = soft_targets(n, vocab, k, generator)
        for renormalize in (False,) if args.no_renormalize else (False, True):
            loss = KDLoss(alpha=0.5, temperature=1.0, renormalize=renormalize)
            name = f"kd k={k}" + (" renorm" if renormalize else "")
            losses[name] = lambda x, loss=loss, targets=targets: loss(x, targets, labels, mask).total

    def step(loss_fn: LossFn) -> None:
        logits = model(inputs).logits.reshape(n, vocab)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(logits).backward()
        optimizer.step()

    fixed = torch.randn(n, vocab, generator=generator)

    def loss_only(loss_fn: LossFn) -> None:
        x = fixed.clone().requires_grad_(True)  # a leaf, so backward stops at the loss
        loss_fn(x).backward()

    print(
        f"student {STUDENT} ({count_parameters(model) / 1e6:.1f}M parameters), V={vocab:,}, "
        f"N={args.batch}x{args.seq}={n} positions, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for fn in losses.values():  # warm-up: allocator, AdamW state, first-call overheads
        step(fn)
        loss_only(fn)
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in losses}
    loss_times: dict[str, list[tuple[float, float]]] = {name: [] for name in losses}
    for _ in range(args.rounds):
        for name, fn in losses.items():
            steps[name].append(timed(step, fn))
            loss_times[name].append(timed(loss_only, fn))

    def median(samples: list[tuple[float, float]], which: int) -> float:
        return statistics.median(s[which] for s in samples)

    def ratio(name: str, samples: dict[str, list[tuple[float, float]]], which: int) -> float:
        return statistics.median(a[which] / b[which] for a, b in zip(samples[name], samples["ce"]))

    print(
        f"{'variant':<16}{'step CPU ms':>12}{'KD/CE':>7}{'step wall ms':>14}{'KD/CE':>7}"
        f"{'loss CPU ms':>13}{'KD/CE':>7}{'loss share':>12}"
    )
    figures = {}
    for name in losses:
        figures[name] = {
            "step_cpu_ms": median(steps[name], 0),
            "step_ratio_cpu": ratio(name, steps, 0),
            "step_wall_ms": median(steps[name], 1),
            "step_ratio_wall": ratio(name, steps, 1),
            "loss_cpu_ms": median(loss_times[name], 0),
            "loss_ratio_cpu": ratio(name, loss_times, 0),
        }
        f = figures[name]
        print(
            f"{name:<16}{f['step_cpu_ms']:>12.0f}{f['step_ratio_cpu']:>7.3f}{f['step_wall_ms']:>14.0f}"
            f"{f['step_ratio_wall']:>7.3f}{f['loss_cpu_ms']:>13.0f}{f['loss_ratio_cpu']:>7.3f}"
            f"{f['loss_cpu_ms'] / f['step_cpu_ms']:>12.1%}"
        )
    worst = max(f["step_ratio_cpu"] for name, f in figures.items() if name != "ce")
    print(
        f"worst KD/CE step ratio (CPU time) {worst:.3f}: "
        f"target <= {TARGET:.2f} {'met' if worst <= TARGET else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "variants": figures,
                    "worst_step_ratio_cpu": worst,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
