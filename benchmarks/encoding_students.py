"""A language-model student trained from the int8 (and fp16) cache against the fp32 cache, paired by seed.

Issue 11 asks whether the compact encodings change what a student learns, not only the loss on fixed logits
(``encodings.py``). For each seed, the same student (same seed: same initialisation and data order; same
hyper-parameters) is trained by ``python -m pipeline train-student`` from each cache, and every run is scored on
the same held-out split against the same exact (fp32) cache: eval KL to the teacher, cross-entropy (ln of the
perplexity) and top-1 agreement. The first ``--cache`` is the reference; the others are compared with it.

Per metric and encoding the table gives the paired differences (encoding - reference, same seed), their mean
with a Student-t 95% interval, and the reference's seed-to-seed standard deviation: what choosing another seed
changes. An encoding is *within noise* when the whole interval lies within one seed-to-seed standard deviation
of zero. ``--control`` trains the reference once more with the first seed: the run-to-run difference of
identical runs, the floor under every paired difference. The untrained student (each seed's initialisation,
scored the same way) shows that the students learned something.

    python benchmarks/encoding_students.py --train-data /tmp/smol/bbc/train.parquet \\
        --eval-data /tmp/smol/bbc/val.parquet --eval-cache bbb79691 --cache-dir /tmp/smol/cache \\
        --cache FP32_KEY --cache INT8_KEY --cache FP16_KEY --seeds 0,1,2 --json encoding_students.json

A run whose ``metrics.json`` exists and whose log starts with the same command is kept, so an interrupted
invocation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scipy import stats

from stages import cache_format as fmt
from stages.config import TrainStudentConfig, default_cache_root
from stages.errors import PipelineError
from stages.evaluate import evaluate
from stages.run_dir import read_metrics
from stages.train_student import Trainer

ROOT = Path(__file__).resolve().parents[1]
# Metric name in metrics.json -> (column label, digits); eval_ce is ln(eval_perplexity), added by `scores`.
METRICS = {"eval_kl": ("eval KL", 4), "eval_ce": ("eval CE", 4), "eval_agreement": ("agreement", 4)}


def paired_stats(reference: list[float], other: list[float], confidence: float = 0.95) -> dict:
    """Paired differences other - reference (one pair per seed) against the reference's seed-to-seed spread.

    Returns the differences, their mean, standard deviation and Student-t interval of the mean, the reference's
    seed-to-seed standard deviation (sample, n - 1), and ``within_noise``: the interval lies inside
    +- that standard deviation, i.e. the encoding moves the metric by less than another seed does.
    """
    if len(reference) != len(other) or len(reference) < 2:
        raise ValueError(f"need the same seeds for both, at least 2; got {len(reference)} and {len(other)} values")
    diffs = [o - r for r, o in zip(reference, other)]
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    seed_sd = statistics.stdev(reference)
    return {
        "diffs": diffs,
        "mean": mean,
        "sd": sd,
        "ci": [mean - half, mean + half],
        "seed_sd": seed_sd,
        "within_noise": abs(mean) + half <= seed_sd,
    }


def scores(metrics: dict) -> dict[str, float]:
    """The compared metrics of one run's (or the untrained student's) held-out evaluation."""
    return {
        "eval_kl": metrics["eval_kl"],
        "eval_ce": math.log(metrics["eval_perplexity"]),
        "eval_agreement": metrics["eval_agreement"],
    }


def open_caches(refs: list[str], cache_dir: str, top_k: int) -> dict[str, fmt.Cache]:
    """The caches by encoding, checked to hold one teacher at one temperature, with a common k (or --top-k)."""
    caches = [fmt.open_cache(fmt.resolve_cache(ref, cache_dir)) for ref in refs]
    by_encoding: dict[str, fmt.Cache] = {}
    first = caches[0]
    for cache in caches:
        encoding = getattr(cache.format, "encoding", None)
        if encoding is None:
            raise SystemExit(f"cache {cache.key} is a {cache.target_format} cache; give top-k caches")
        if encoding in by_encoding:
            raise SystemExit(f"caches {by_encoding[encoding].key} and {cache.key} are both {encoding}; give one each")
        # train-student checks each cache against --train-data; the teacher and T are this comparison's to check.
        if cache.manifest["teacher"]["sha256"] != first.manifest["teacher"]["sha256"] or (
            cache.temperature != first.temperature
        ):
            raise SystemExit(f"caches {first.key} and {cache.key} differ in teacher or temperature")
        by_encoding[encoding] = cache
    widths = {cache.top_k for cache in caches}
    if len(widths) > 1 and not top_k:
        raise SystemExit(f"the caches hold different k {sorted(widths)}; pass --top-k K (K <= {min(widths)})")
    if top_k > min(widths):
        raise SystemExit(f"--top-k {top_k} exceeds the narrowest cache's k = {min(widths)}")
    return by_encoding


def train_command(args: argparse.Namespace, cache: fmt.Cache, seed: int, out: Path) -> list[str]:
    cmd = ["train-student", "--data", args.train_data, "--cache", str(cache.path), "--student", args.student]
    cmd += ["--alpha", "1", "--temperature", "1", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    cmd += ["--lr", str(args.lr), "--lr-schedule", args.lr_schedule, "--warmup-steps", str(args.warmup_steps)]
    cmd += ["--seed", str(seed), "--eval-data", args.eval_data, "--eval-cache", args.eval_cache]
    cmd += ["--cache-dir", args.cache_dir, "--threads", str(args.threads), "--top-k", str(args.top_k)]
    return cmd + ["--out", str(out), "--overwrite", "--no-onnx", "--quiet"]


def train(args: argparse.Namespace, cache: fmt.Cache, seed: int, name: str) -> dict:
    """One run as a subprocess (kept when finished by the same command); its scores, train and wall seconds."""
    out = Path(args.out) / name
    log = Path(args.out) / f"{name}.log"
    cmd = train_command(args, cache, seed, out)
    header = "pipeline " + shlex.join(cmd)
    kept = read_metrics(out) is not None and log.is_file() and log.read_text().split("\n", 1)[0] == header
    t0, cpu0 = time.perf_counter(), _children_cpu()
    if not kept:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONPATH": str(ROOT)}  # this checkout's pipeline, not an installed one
        with open(log, "w") as fh:
            fh.write(header + "\n")
            fh.flush()
            done = subprocess.run(
                [sys.executable, "-m", "pipeline", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env
            )
        if done.returncode:
            last = log.read_text().strip().splitlines()[-1]
            raise SystemExit(f"run {name} failed (exit {done.returncode}): {last} (whole log: {log})")
    metrics = read_metrics(out)
    # CPU seconds, not only wall: on a machine shared with other jobs they are what the run really cost.
    wall, cpu = (None, None) if kept else (time.perf_counter() - t0, _children_cpu() - cpu0)
    print(f"  {name}: eval KL {metrics['eval_kl']:.4f}, train {metrics['train_seconds']:.0f} s", flush=True)
    timing = {"train_seconds": metrics["train_seconds"], "wall_seconds": wall, "cpu_seconds": cpu, "kept": kept}
    return scores(metrics) | timing


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def untrained(args: argparse.Namespace, cache: fmt.Cache, seed: int) -> dict[str, float]:
    """The seed's initial student scored like the runs: the trainer's own setup (seeding, build), no step taken."""
    with tempfile.TemporaryDirectory(prefix="encoding-students-") as out:
        config = TrainStudentConfig(
            data=args.train_data,
            cache=[str(cache.path)],
            out=out,
            student=args.student,
            alpha=1.0,
            batch_size=args.batch_size,
            seed=seed,
            eval_data=args.eval_data,
            eval_cache=args.eval_cache,
            cache_dir=args.cache_dir,
            threads=args.threads,
            export_onnx=False,
            overwrite=True,
        )
        trainer = Trainer(config, progress=False, log=lambda *_: None)
        try:
            trainer.setup()
            metrics = evaluate(
                trainer.model, trainer.eval_set, device=trainer.device, token_level=True, vocab=trainer.vocab
            )
        finally:
            trainer.close()
    return scores({f"eval_{name}": value for name, value in metrics.items()})


def summarise(runs: dict, seeds: list[int], reference: str) -> dict:
    """paired_stats per metric and compared encoding."""
    out: dict[str, dict] = {}
    for encoding in runs:
        if encoding == reference:
            continue
        out[encoding] = {
            metric: paired_stats(
                [runs[reference][str(s)][metric] for s in seeds], [runs[encoding][str(s)][metric] for s in seeds]
            )
            for metric in METRICS
        }
    return out


def markdown(result: dict) -> str:
    seeds, ref, runs = result["seeds"], result["reference"], result["runs"]
    others = [e for e in runs if e != ref]
    lines = []
    for metric, (label, digits) in METRICS.items():
        head = ["seed", f"untrained {label}", f"{ref} {label}"]
        for e in others:
            head += [f"{e} {label}", f"{e} - {ref}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in map(str, seeds):
            row = [s, f"{result['untrained'][s][metric]:.{digits}f}", f"{runs[ref][s][metric]:.{digits}f}"]
            for e in others:
                row += [f"{runs[e][s][metric]:.{digits}f}", f"{runs[e][s][metric] - runs[ref][s][metric]:+.2e}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        f"| metric | encoding | mean paired diff | sd of diffs | 95% interval | {ref} seed-to-seed sd | within noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in others:
        for metric, (label, _) in METRICS.items():
            p = result["paired"][e][metric]
            lines.append(
                f"| {label} | {e} | {p['mean']:+.2e} | {p['sd']:.2e} | [{p['ci'][0]:+.2e}, {p['ci'][1]:+.2e}] "
                f"| {p['seed_sd']:.2e} | {'yes' if p['within_noise'] else 'no'} |"
            )
    if result.get("control"):
        c = result["control"]
        lines += [
            "",
            f"Control: {ref} trained twice with seed {seeds[0]}: "
            + ", ".join(f"{METRICS[m][0]} {c[m] - runs[ref][str(seeds[0])][m]:+.2e}" for m in METRICS),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data", required=True, help="training dataset the caches were built from")
    parser.add_argument("--cache", action="append", required=True, help="cache path/key; the first is the reference")
    parser.add_argument("--eval-data", required=True, help="held-out dataset every run is scored on")
    parser.add_argument("--eval-cache", required=True, help="exact (fp32) cache of --eval-data: KL and agreement")
    parser.add_argument("--cache-dir", default=default_cache_root(), help="where cache keys are looked up")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, at least 2")
    parser.add_argument("--student", default="causal-lm:layers=2,d_model=128,heads=4", help="--student spec")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--lr-schedule", default="cosine", help="train-student --lr-schedule")
    parser.add_argument("--warmup-steps", type=int, default=10, help="train-student --warmup-steps")
    parser.add_argument("--top-k", type=int, default=0, help="train on the first K cached ids (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--control", action="store_true", help="train the reference twice with the first seed")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "encoding-students"), help="run dirs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        parser.error(f"--seeds {args.seeds}: give at least 2 seeds, each once (the paired spread needs them)")
    try:
        result = compare(
            args, seeds, "python benchmarks/encoding_students.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        )
    except PipelineError as error:  # a cache or dataset the runs cannot use: its one-line reason
        raise SystemExit(f"error: {error}") from None
    print(markdown(result))
    print(
        f"wall time {result['wall_seconds']:.0f} s, CPU of the runs trained now {result['training_cpu_seconds']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare(args: argparse.Namespace, seeds: list[int], command: str) -> dict:
    """Every run of every seed and encoding (and the control), scored, with the paired statistics."""
    t0 = time.perf_counter()
    caches = open_caches(args.cache, args.cache_dir, args.top_k)
    encodings = list(caches)
    reference = encodings[0]
    print(f"caches: {', '.join(f'{e} {c.key} (k={c.top_k})' for e, c in caches.items())}", flush=True)
    runs: dict[str, dict[str, dict]] = {e: {} for e in encodings}
    initial: dict[str, dict] = {}
    for i, seed in enumerate(seeds):
        initial[str(seed)] = untrained(args, caches[reference], seed)
        print(f"seed {seed}: untrained eval KL {initial[str(seed)]['eval_kl']:.4f}", flush=True)
        # Rotate the order per seed, so a change in the shared machine's load does not always hit one encoding.
        for encoding in encodings[i % len(encodings) :] + encodings[: i % len(encodings)]:
            runs[encoding][str(seed)] = train(args, caches[encoding], seed, f"{encoding}-seed{seed}")
    control = train(args, caches[reference], seeds[0], f"{reference}-seed{seeds[0]}-again") if args.control else None

    return {
        "command": command,
        "caches": {
            e: {"key": c.key, "top_k": c.top_k, "bytes_per_position": c.manifest["bytes_per_position"]}
            for e, c in caches.items()
        },
        "seeds": seeds,
        "reference": reference,
        "untrained": initial,
        "runs": runs,
        "control": control,
        "paired": summarise(runs, seeds, reference),
        "wall_seconds": time.perf_counter() - t0,
        "training_cpu_seconds": _children_cpu(),  # every run trained by this invocation, setup included
    }


if __name__ == "__main__":
    main()
