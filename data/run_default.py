"""The README's main job: run each bundled teacher once, train four students from the caches, compare them.

    bash data/run_default.sh [--quiet]

Stage one caches each teacher once over data/mnist1d/train_transfer/ (the 4,000 labelled rows, then the unlabelled
transfer set) and once over the test split; run the job again and every cache is a hit: no teacher runs. Stage two
trains the same MLP from those caches, each run told only which rows and targets to use:

    scratch       labels only: the labelled rows, no teacher (alpha 0, labelled_only)
    kd            KD on the labelled rows (labelled_only)
    kd-transfer   KD on every row: the cached teacher is the only label of the transfer rows (alpha 1)
    ensemble      the same with both teachers' probabilities mixed (method ensemble)

Then a table, and `pipeline report` of the four runs (PNG plots and report.md) beside them. Caches go to
$KD_CACHE_DIR (default .kd-cache/), runs to $KD_RUNS_DIR/default (default runs/default). Settings come from
BENCHMARKS.md (chosen there on a validation split); epochs are cut to fit the job into about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.catalog import Catalog
from pipeline.report import write_report
from stages import cache_teacher, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.dataset import Dataset
from stages.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "mnist1d"
TRAIN = DATA / "train_transfer"  # 0-train.parquet (labelled), 1-transfer.parquet (label null)
TEST = DATA / "test.parquet"
TEACHERS = ("teacher_cnn", "teacher_cnn_seed1")  # the first is "the teacher" of agreement and gap closed
STUDENT = "mlp:hidden=100x100"  # the MNIST-1D paper's MLP (15,210 parameters)


@dataclass
class Student:
    name: str  # run directory under runs/default
    label: str  # the table's first column
    teachers: int  # how many of TEACHERS it distils from (0: none)
    settings: dict = field(default_factory=dict)  # TrainStudentConfig fields


# One student throughout, without dropout (BENCHMARKS.md's scratch row adds dropout and reaches 66.6%; KD on the
# labelled rows alone then adds only ~1 point). Labelled rows: its KD-on-labels T and alpha, 60 epochs for both runs.
# Transfer runs: its KD + transfer settings, 30 epochs instead of 40 (the job's time budget).
LABELLED = {"batch_size": 128, "lr": 3e-3, "epochs": 60, "labelled_only": True}
TRANSFER = {"batch_size": 256, "lr": 3e-3, "epochs": 30, "alpha": 1.0, "temperature": 4.0}
STUDENTS = [
    Student("scratch", "scratch (labels only)", 0, LABELLED | {"alpha": 0.0}),
    Student("kd", "KD, labelled rows", 1, LABELLED | {"alpha": 0.5, "temperature": 8.0}),
    Student("kd-transfer", "KD + transfer set", 1, TRANSFER),
    Student("ensemble", "KD + transfer, 2 teachers", 2, TRANSFER | {"method": "ensemble"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="print the table only: no progress bars or steps")
    args = parser.parse_args()
    try:
        run_job(quiet=args.quiet)
    except PipelineError as exc:
        sys.exit(f"error: {exc}")


def run_job(quiet: bool) -> None:
    started = time.perf_counter()
    cache_dir = Path(os.environ.get("KD_CACHE_DIR") or ".kd-cache")
    runs = Path(os.environ.get("KD_RUNS_DIR") or "runs") / "default"
    runs.mkdir(parents=True, exist_ok=True)
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    train, test = Dataset(TRAIN), Dataset(TEST)
    labelled = train.num_rows - train.read(0, train.num_rows, ["label"]).column("label").null_count
    say(
        f"MNIST-1D: {labelled:,} labelled + {train.num_rows - labelled:,} unlabelled transfer rows in {_shown(TRAIN)}, "
        f"{test.num_rows:,} test rows"
    )
    with open(runs / "job.log", "w") as job_log:  # the stages' own lines (per cache, per epoch): kept, not shown

        def log(message: str) -> None:
            job_log.write(message + "\n")

        caches = {data: {} for data in (TRAIN, TEST)}  # dataset -> teacher -> cache directory
        cache_seconds, hits = 0.0, 0
        for teacher in TEACHERS:
            for data in caches:
                config = CacheTeacherConfig(
                    teacher=str(DATA / f"{teacher}.onnx"), data=str(data), top_k=10, cache_dir=str(cache_dir)
                )  # k = all 10 classes at T = 1: exact, so each student re-tempers it to its own T
                result = cache_teacher.run(config, progress=not quiet, log=log)
                caches[data][teacher] = str(result.path)
                cache_seconds += result.manifest["run"]["seconds"]  # the teacher's time when it did run
                hits += result.hit
                done = "cache hit, the teacher did not run" if result.hit else "cached"
                say(f"cache-teacher {teacher} over {data.name}: {done} ({_shown(result.path)})")

        metrics = {}
        for student in STUDENTS:
            config = TrainStudentConfig(
                data=str(TRAIN),
                cache=[caches[TRAIN][t] for t in TEACHERS[: student.teachers]],
                out=str(runs / student.name),
                student=STUDENT,
                seed=0,
                eval_data=str(TEST),  # every epoch, for the report's learning curves; nothing is selected on it
                eval_cache=caches[TEST][TEACHERS[0]],
                threads=1,  # a 15k-parameter MLP: more threads only wait on each other
                export_onnx=False,
                overwrite=True,
                **student.settings,
            )
            say(f"train-student {student.name}: {student.label}, {config.epochs} epochs")
            metrics[student.name] = train_student.run(config, progress=not quiet, log=log)

        catalog = Catalog(cache_dir, runs)
        report = write_report(catalog, [catalog.run(str(runs / s.name)) for s in STUDENTS], runs / "report")

    teacher_accuracy = json.loads((DATA / f"{TEACHERS[0]}.json").read_text())["test_accuracy"]
    print(table(metrics, teacher_accuracy, labelled, train.num_rows))
    this_run = f"{hits} cache hits, no teacher ran" if hits == len(TEACHERS) * len(caches) else f"{hits} cache hits"
    print(
        f"\nteachers: cached once in {cache_seconds:.1f} s ({len(TEACHERS)} teachers over {train.num_rows:,} + "
        f"{test.num_rows:,} test rows); this run: {this_run}"
    )
    print(
        f"students: {sum(m['train_seconds'] for m in metrics.values()):.1f} s of training for the {len(STUDENTS)} runs"
    )
    print(f"runs: {_shown(runs)}/{{{','.join(s.name for s in STUDENTS)}}} (stage logs: {_shown(runs / 'job.log')})")
    print(f"report (pipeline report, PNG plots): {_shown(report)}")
    print(f"main job: {time.perf_counter() - started:.0f} s")


def _shown(path: Path) -> str:
    """Relative to the working directory when inside it: shorter, and what the README shows."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def table(metrics: dict[str, dict], teacher_accuracy: float, labelled: int, total: int) -> str:
    """Test accuracy, agreement with the teacher, the share of the scratch-to-teacher gap closed, train seconds."""
    scratch = metrics["scratch"]["test_accuracy"]
    rows = [("student (MLP 100x100)", "rows", "test acc", "agreement", "gap closed", "train s")]
    for student in STUDENTS:
        m = metrics[student.name]
        gap = (m["test_accuracy"] - scratch) / (teacher_accuracy - scratch)
        rows.append(
            (
                student.label,
                f"{labelled:,}" if student.settings.get("labelled_only") else f"{total:,}",
                f"{m['test_accuracy']:.1%}",
                f"{m['test_agreement']:.1%}",
                "—" if student.name == "scratch" else f"{gap:.0%}",
                f"{m['train_seconds']:.1f}",
            )
        )
    rows.append((f"teacher CNN ({TEACHERS[0]}.onnx)", "", f"{teacher_accuracy:.1%}", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n" + "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    )


if __name__ == "__main__":
    main()
