"""What exact resume costs: one checkpoint's write time over the training time between two checkpoints.

Target: checkpoint time / (--checkpoint-every x step time) <= 2 % at the default interval. The step is a
causal-LM student's full training step (forward, loss, backward, AdamW step) on random tokens; the checkpoint is
``stages.checkpoint.save`` of the state the trainer saves (model, AdamW moments, lr schedule, RNG states, the
loader position and counters) into a run directory: torch.save to a temp name, then a rename. Also the step-time
ratio of bf16 autocast to fp32 on this CPU (``--precision bf16``), interleaved round by round so that load drift
hits both alike. Times are wall-clock medians.

    python benchmarks/checkpoint_cost.py                                   # causal-lm:layers=2,d_model=256, V 8192
    python benchmarks/checkpoint_cost.py --student causal-lm:layers=4,d_model=512 --vocab 32000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from stages import checkpoint
from stages.config import TrainStudentConfig
from stages.students import build_student, count_parameters

DEFAULT_INTERVAL = TrainStudentConfig().checkpoint_every
TARGET = 0.02  # the bound on checkpoint time as a fraction of training time


def step_seconds(model, optimizer, batch: torch.Tensor, dtype: torch.dtype | None) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model({"input_ids": batch, "attention_mask": torch.ones_like(batch)}).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="causal-lm:layers=2,d_model=256")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds: one fp32 and one bf16 step each")
    parser.add_argument("--saves", type=int, default=5, help="timed checkpoint writes")
    parser.add_argument("--interval", type=int, default=DEFAULT_INTERVAL, help="steps between checkpoints")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_student(args.student, num_outputs=args.vocab, vocab_size=args.vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = LambdaLR(optimizer, lambda step: 1.0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq))
    for dtype in (None, torch.bfloat16):  # warm-up: allocator, kernels, AdamW's moments
        step_seconds(model, optimizer, batch, dtype)
    fp32, bf16 = [], []
    for _ in range(args.rounds):
        fp32.append(step_seconds(model, optimizer, batch, None))
        bf16.append(step_seconds(model, optimizer, batch, torch.bfloat16))

    saves = []
    with tempfile.TemporaryDirectory() as run:
        for i in range(args.saves):
            started = time.perf_counter()
            state = {  # what Trainer._checkpoint gathers, counters and history being a few hundred bytes
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": checkpoint.rng_state(),
                "step": i,
                "history": [],
            }
            checkpoint.save(Path(run), i, state)
            saves.append(time.perf_counter() - started)
        size = checkpoint.paths(Path(run))[-1].stat().st_size

    step, save = statistics.median(fp32), statistics.median(saves)
    figures = {
        "student": args.student,
        "parameters": count_parameters(model),
        "tokens_per_step": args.batch * args.seq,
        "step_ms_fp32": 1000 * step,
        "step_ms_bf16": 1000 * statistics.median(bf16),
        "bf16_over_fp32": statistics.median(b / f for b, f in zip(bf16, fp32)),
        "checkpoint_ms": 1000 * save,
        "checkpoint_mib": size / 2**20,
        "interval": args.interval,
        "checkpoint_fraction": save / (args.interval * step),
        "steps_per_checkpoint_at_2_percent": save / (TARGET * step),
        "threads": torch.get_num_threads(),
    }
    for key, value in figures.items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    verdict = "meets" if figures["checkpoint_fraction"] <= TARGET else "misses"
    print(
        f"checkpoint cost at --checkpoint-every {args.interval}: {100 * figures['checkpoint_fraction']:.3f} % "
        f"of training time ({verdict} the {100 * TARGET:.0f} % target)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
