"""Streaming-loader throughput against the student's consumption rate, and the loader's peak memory.

Two caches built with the pipeline itself (content-addressed under --work-dir, so a second run is a cache hit):

- tokens: a tiny ONNX token teacher with a SmolLM2-sized vocabulary (tests/teachers.py, V = 49,152, width 16)
  over 2,000 random sequences of 64-256 tokens, top-k 32 at T = 1; student ``causal-lm:layers=2,d_model=256``.
- mnist1d: the bundled MNIST-1D CNN teacher over a 50,000-row unlabelled transfer set (data/build_default.py
  --transfer), top-k 10 at T = 4 as in data/run_default.sh; student ``mlp`` (100x100).

For each, one epoch of ``StreamingLoader`` is timed with 0 and with 2 DataLoader workers (positions/s,
batches/s, and the wait for the first batch, which the trainer pays every epoch), and the student's training
steps (forward, KD loss, backward, AdamW) are timed on batches taken from the loader beforehand, so the two
rates are measured apart. loader / student >= 1 means the loader is not the bottleneck once it runs in
workers; with 0 workers the two run in turn, and ``inline share`` is the loader's part of each step.

Memory: the peak RSS growth of a 0-worker loader over two epochs, each measured in a fresh process (VmHWM),
for the token dataset and for its first quarter: a bounded loader's peak is set by its shuffle window and
the shards it decodes, not by the number of rows.

    python -m benchmarks.loader_throughput                    # from the repository root (it imports tests/)
    python -m benchmarks.loader_throughput --transfer 10000   # a smaller MNIST-1D transfer set
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages import cache_teacher
from stages.cache_format import open_cache
from stages.config import CacheTeacherConfig
from stages.dataset import Dataset
from stages.evaluate import flatten
from stages.loader import Batch, StreamingLoader
from stages.losses import KDLoss
from stages.students import build_student
from tests import teachers

REPO = Path(__file__).resolve().parent.parent
MNIST1D_TEACHER = REPO / "data" / "mnist1d" / "teacher_cnn.onnx"
TOKEN_STUDENT = "causal-lm:layers=2,d_model=256"


@dataclass
class Case:
    """One dataset, its cache, and how the trainer would read it."""

    data: Path
    cache: Path
    input_columns: list[str]
    token_level: bool
    batch_size: int
    buffer: int  # examples per shuffle window

    def loader(self) -> StreamingLoader:
        return StreamingLoader(
            Dataset(self.data),
            [open_cache(self.cache)],
            input_columns=self.input_columns,
            batch_size=self.batch_size,
            token_level=self.token_level,
            buffer_examples=self.buffer,
            seed=0,
        )


def build_cache(config: CacheTeacherConfig) -> Path:
    started = time.perf_counter()
    result = cache_teacher.run(config, progress=False, log=lambda message: None)
    how = "cache hit" if result.hit else f"built in {time.perf_counter() - started:.0f} s"
    print(f"  cache {result.path.name}: {result.manifest['num_positions']:,} positions ({how})")
    return result.path


def token_case(work: Path, sequences: int, args: argparse.Namespace) -> Case:
    data = work / f"tokens-{sequences}-v{args.vocab}.parquet"
    teacher = work / f"token-teacher-v{args.vocab}.onnx"
    if not teacher.exists():
        teachers.make_token_teacher(teacher, vocab=args.vocab, dim=16)
    if not data.exists():
        # Seed 0 for every size: the smaller dataset is the larger one's first rows.
        seqs = teachers.random_sequences(sequences, args.vocab, min_len=64, max_len=256, seed=0)
        ids = pa.array(np.arange(sequences))
        pq.write_table(
            pa.table({"id": ids, "input_ids": pa.array([s.tolist() for s in seqs], pa.list_(pa.int64()))}),
            data,
            row_group_size=256,
        )
    # The shard size is not part of the cache key, so each shard size gets its own cache root.
    # batch_size 8: a [8, 256, V] float32 logits block is 400 MB at V = 49,152.
    config = CacheTeacherConfig(
        teacher=str(teacher),
        data=str(data),
        top_k=args.top_k,
        temperature=1.0,
        cache_dir=str(work / f"cache-shard{args.token_shard}"),
        batch_size=8,
        shard_size=args.token_shard,
        encoding=args.encoding,
    )
    return Case(data, build_cache(config), ["input_ids"], True, args.token_batch, args.token_buffer)


def mnist1d_case(work: Path, args: argparse.Namespace) -> Case:
    data = work / f"mnist1d-transfer-{args.transfer}.parquet"
    if not data.exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "data" / "build_default.py"),
                "--transfer",
                str(args.transfer),
                "--transfer-seed",
                "1",
                "--transfer-out",
                str(data),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    config = CacheTeacherConfig(
        teacher=str(MNIST1D_TEACHER), data=str(data), top_k=10, temperature=4.0, cache_dir=str(work / "cache")
    )
    return Case(data, build_cache(config), ["x"], False, args.mnist_batch, args.mnist_buffer)


def batches(case: Case, workers: int):
    """The trainer's way: the loader itself with 0 workers, else a DataLoader around it (batch_size=None)."""
    if workers == 0:
        return case.loader()
    return torch.utils.data.DataLoader(case.loader(), batch_size=None, num_workers=workers)


def epoch(case: Case, workers: int) -> tuple[float, float, float]:
    """(batches/s, positions/s, seconds to the first batch) over one epoch."""
    n_batches = positions = 0
    started = time.perf_counter()
    first = 0.0
    for batch in batches(case, workers):
        if not n_batches:
            first = time.perf_counter() - started
        n_batches += 1
        positions += int(batch.mask.sum())
    seconds = time.perf_counter() - started
    return n_batches / seconds, positions / seconds, first


def student_rate(case: Case, student: torch.nn.Module, steps: int) -> tuple[float, float]:
    """(steps/s, positions/s) of full training steps on batches materialised before the timing."""
    held = []
    for batch in case.loader():
        held.append(batch)
        if len(held) == 4:
            break
    cache = open_cache(case.cache)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss = KDLoss(alpha=0.5, temperature=cache.temperature)

    def step(batch: Batch) -> None:
        logits, labels, mask, targets = flatten(batch, student(batch.inputs).logits, None)
        out = loss(logits, targets[0], labels, mask)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()

    step(held[0])  # warm-up: AdamW state, allocator
    positions = 0
    started = time.perf_counter()
    for i in range(steps):
        batch = held[i % len(held)]
        step(batch)
        positions += int(batch.mask.sum())
    seconds = time.perf_counter() - started
    return steps / seconds, positions / seconds


def kib(field: str) -> int:
    """A ``Vm*`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(case: Case) -> list[float]:
    """Peak RSS growth (MiB) of a 0-worker loader after epochs 1 and 2; run it in a fresh process."""
    source = case.loader()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    before = kib("VmRSS")
    peaks = []
    for epoch_index in (0, 1):
        source.set_epoch(epoch_index)
        for _ in source:
            pass
        peaks.append((kib("VmHWM") - before) / 1024)
    return peaks


def fresh_peak_growth(case: Case) -> list[float]:
    """``peak_growth`` in a new process, so memory this one freed earlier cannot hide the loader's."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(peak_growth, case).result()


def decoded_mib(case: Case) -> tuple[float, int]:
    """(MiB of every target decoded at once, shards): int64 ids, float32 logp and logz, int64 row id."""
    manifest = open_cache(case.cache).manifest
    return manifest["num_positions"] * (12 * manifest["top_k"] + 12) / 2**20, len(manifest["shards"])


def report(case: Case, student: torch.nn.Module, steps: int, workers_list: list[int]) -> dict:
    step_per_s, step_positions = student_rate(case, student, steps)
    print(
        f"  student: {step_per_s:.2f} steps/s, {step_positions:,.0f} positions/s "
        f"(batch {case.batch_size}, {steps} steps on pre-materialised batches)"
    )
    print(
        f"  {'workers':>9}{'batches/s':>11}{'positions/s':>14}{'first batch s':>15}{'loader/student':>16}"
        f"{'inline share':>14}"
    )
    figures = {"student_steps_per_s": step_per_s, "student_positions_per_s": step_positions, "loader": {}}
    for workers in workers_list:
        per_s, positions_per_s, first = epoch(case, workers)
        inline = (1 / per_s) / (1 / per_s + 1 / step_per_s)  # loader's part of a step when the two run in turn
        print(
            f"  {workers:>9}{per_s:>11.1f}{positions_per_s:>14,.0f}{first:>15.2f}{per_s / step_per_s:>16.1f}"
            f"{inline:>14.1%}"
        )
        figures["loader"][workers] = {
            "batches_per_s": per_s,
            "positions_per_s": positions_per_s,
            "first_batch_s": first,
            "loader_over_student": per_s / step_per_s,
            "inline_share": inline,
        }
    return figures


def memory(case: Case) -> dict:
    mib, shards = decoded_mib(case)
    first, second = fresh_peak_growth(case)
    rows = Dataset(case.data).num_rows
    print(
        f"    {rows:>7,} examples, {shards:>3} shards, targets {mib:>5,.0f} MiB decoded: "
        f"peak RSS growth {first:.0f} MiB after 1 epoch, {second:.0f} MiB after 2"
    )
    return {"examples": rows, "shards": shards, "decoded_mib": mib, "peak_growth_mib": [first, second]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "kd-bench",
        help="datasets, teachers and caches; kept, so a rerun reuses them",
    )
    parser.add_argument("--sequences", type=int, default=2000, help="token dataset size")
    parser.add_argument("--vocab", type=int, default=49152, help="token teacher and student vocabulary")
    parser.add_argument("--top-k", type=int, default=32, help="ids cached per token")
    parser.add_argument("--encoding", default="fp32", help="top-k encoding of the token cache (fp32, fp16, int8)")
    parser.add_argument("--token-shard", type=int, default=128, help="sequences per token cache shard")
    parser.add_argument("--token-batch", type=int, default=8, help="sequences per token batch")
    parser.add_argument("--token-buffer", type=int, default=128, help="token shuffle window, in sequences")
    parser.add_argument("--token-steps", type=int, default=5, help="timed causal-LM steps")
    parser.add_argument("--transfer", type=int, default=50000, help="MNIST-1D transfer set size")
    parser.add_argument("--mnist-batch", type=int, default=128, help="rows per MNIST-1D batch (run_default.sh's)")
    parser.add_argument(
        "--mnist-buffer", type=int, default=8192, help="MNIST-1D shuffle window (the trainer's default)"
    )
    parser.add_argument("--mnist-steps", type=int, default=300, help="timed MLP steps")
    parser.add_argument("--workers", type=str, default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--only", choices=["tokens", "mnist1d"], help="run one case")
    # One thread: DataLoader workers need the other cores, and more threads than free cores make torch's
    # thread pool spin (a 100x100 MLP step took 60 ms with 2 threads on a busy 2-core machine, 5 ms with 1).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the student")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workers = [int(w) for w in args.workers.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} student thread(s), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    figures: dict[str, dict] = {}
    if args.only in (None, "tokens"):
        print(
            f"tokens: {args.sequences:,} sequences of 64-256 tokens, V={args.vocab:,}, k={args.top_k}, "
            f"shards of {args.token_shard} sequences, shuffle window {args.token_buffer}"
        )
        case = token_case(args.work_dir, args.sequences, args)
        small = token_case(args.work_dir, args.sequences // 4, args)
        figures["tokens"] = report(
            case, build_student(TOKEN_STUDENT, num_outputs=args.vocab), args.token_steps, workers
        )
        print("  memory, 0 workers:")
        figures["tokens"]["memory"] = [memory(small), memory(case)]
    if args.only in (None, "mnist1d"):
        print(f"mnist1d: {args.transfer:,}-row transfer set, k=10, T=4, shuffle window {args.mnist_buffer}")
        case = mnist1d_case(args.work_dir, args)
        figures["mnist1d"] = report(case, build_student("mlp", num_outputs=10, input_dim=40), args.mnist_steps, workers)
        print("  memory, 0 workers:")
        figures["mnist1d"]["memory"] = [memory(case)]
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
