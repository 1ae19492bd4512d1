"""Both stages under torchrun: N processes against 1, measured side by side, as ratios.

Stage one: ``pipeline cache-teacher`` over a synthetic token teacher (``cache_throughput.build_synthetic_teacher``)
as 1 process and as ``torchrun --nproc-per-node N`` ranks, each process with one ONNX Runtime thread and
OMP_NUM_THREADS=1 (on CPU; ``--device cuda`` gives each rank its own GPU instead). Each run writes a fresh cache.
Figures: end-to-end wall time of the command (process start, torch import, rendezvous, teacher load and
hashing, the shards, the manifest) and "steady" throughput (the manifest's ``run``: positions over the
slowest rank's shard loop, which is what a long run approaches). Ratio = N-process throughput / 1-process.

Stage two: ``pipeline train-student`` (KD from that cache, a causal-LM student) as 1 process with the global
batch and as N ranks with global batch / N each; figure: training seconds per optimizer step (the run's
``train_seconds`` over its steps), ratio = N-rank step time / 1-process step time (below 1: faster).

Rounds are interleaved (1, N, 1, N, ...) so other load on the machine falls on both alike; medians and the
per-round ratios are printed.

    python benchmarks/scale_out.py                       # 2 processes on CPU, ~6 min on a 2-core machine
    python benchmarks/scale_out.py --nproc 8 --device cuda --positions 200000   # a GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache_throughput import build_dataset, build_synthetic_teacher

ROOT = Path(__file__).resolve().parents[1]


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pipeline", *args]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return launch + ["-m", "pipeline", *args]


def run(nproc: int, args: list[str]) -> tuple[str, float]:
    """Run one command; (its stdout's last line, wall seconds). Raises with its stderr when it fails."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command(nproc, args), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command(nproc, args))} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1], wall


def stage_one(nproc: int, teacher: Path, data: Path, cache_dir: Path, a: argparse.Namespace) -> dict:
    args = ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--top-k", str(a.top_k)]
    args += ["--shard-size", str(a.shard_size), "--threads", "1", "--device", a.device, "--quiet"]
    path, wall = run(nproc, args + ["--cache-dir", str(cache_dir)])
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    positions = manifest["num_positions"]
    return {
        "path": path,
        "positions": positions,
        "wall_positions_per_second": positions / wall,
        "steady_positions_per_second": manifest["run"]["positions_per_second"],
    }


def stage_two(nproc: int, data: Path, cache: str, out: Path, a: argparse.Namespace) -> dict:
    args = ["train-student", "--data", str(data), "--cache", cache, "--alpha", "1", "--student", a.student]
    args += ["--epochs", "1", "--batch-size", str(a.global_batch // nproc), "--threads", "1", "--no-onnx"]
    args += ["--device", a.device, "--quiet", "--out", str(out)]
    run(nproc, args)
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = metrics["train_seconds"] / metrics["steps"]
    return {"step_seconds": seconds, "steps": metrics["steps"], "global_batch": metrics["global_batch_size"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) against 1")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: one GPU per rank")
    p.add_argument("--positions", type=int, default=24_000, help="token positions cached")
    p.add_argument("--vocab", type=int, default=8_192, help="synthetic teacher's vocabulary")
    p.add_argument("--width", type=int, default=256, help="synthetic teacher's width")
    p.add_argument("--layers", type=int, default=2, help="synthetic teacher's residual layers")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=32, help="sequences per shard: several per rank")
    p.add_argument("--student", default="causal-lm:layers=2,d_model=128")
    p.add_argument("--global-batch", type=int, default=32, help="stage two: sequences per optimizer step in all")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    teacher, data = work / "teacher.onnx", work / "data.parquet"
    build_synthetic_teacher(teacher, a.vocab, a.width, a.layers)
    build_dataset(data, a.positions, 32, 128, a.vocab, None)
    rounds = []
    cache = None
    for r in range(a.rounds):
        row = {}
        for n in (1, a.nproc):
            row[f"one_{n}"] = stage_one(n, teacher, data, work / f"cache-{r}-{n}", a)
            cache = row[f"one_{n}"]["path"]
        for n in (1, a.nproc):
            row[f"two_{n}"] = stage_two(n, data, cache, work / f"run-{r}-{n}", a)
        rounds.append(row)
        print(json.dumps(row), flush=True)

    n = a.nproc
    ratios = {
        "stage_one_wall": [
            r[f"one_{n}"]["wall_positions_per_second"] / r["one_1"]["wall_positions_per_second"] for r in rounds
        ],
        "stage_one_steady": [
            r[f"one_{n}"]["steady_positions_per_second"] / r["one_1"]["steady_positions_per_second"] for r in rounds
        ],
        "stage_two_step_time": [r[f"two_{n}"]["step_seconds"] / r["two_1"]["step_seconds"] for r in rounds],
    }
    medians = {
        "stage_one_1_steady_positions_per_second": statistics.median(
            r["one_1"]["steady_positions_per_second"] for r in rounds
        ),
        f"stage_one_{n}_steady_positions_per_second": statistics.median(
            r[f"one_{n}"]["steady_positions_per_second"] for r in rounds
        ),
        "stage_two_1_step_seconds": statistics.median(r["two_1"]["step_seconds"] for r in rounds),
        f"stage_two_{n}_step_seconds": statistics.median(r[f"two_{n}"]["step_seconds"] for r in rounds),
    }
    print(f"\n{n} processes against 1 ({a.device}; {rounds[0]['one_1']['positions']} positions, {a.rounds} rounds)")
    for name, values in ratios.items():
        print(f"  {name:<22} median {statistics.median(values):.2f}  rounds {', '.join(f'{v:.2f}' for v in values)}")
    for name, value in medians.items():
        print(f"  {name:<40} {value:.4g}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(a).items()},
                    "rounds": rounds,
                    "ratios": ratios,
                    "medians": medians,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
