"""The ``pipeline`` command line. Commands only parse options and hand off to a stage's ``run(config)``."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import cli_catalog
from pipeline.cli_base import errors_to_click, log, main
from stages import run_dir
from stages.config import (
    DEVICES,
    LR_SCHEDULES,
    METHODS,
    POSTPROCESS,
    PRECISIONS,
    TARGET_FORMATS,
    CacheTeacherConfig,
    TrainStudentConfig,
    load_config,
)


@main.command("cache-teacher")
@click.option("--teacher", type=click.Path(dir_okay=False), help="ONNX teacher model.")
@click.option("--data", type=click.Path(), help="Dataset: a Parquet file or a directory of them.")
@click.option("--top-k", type=int, help="Ids cached per position (default: all classes up to 32).")
@click.option("--temperature", type=float, help="Softmax temperature T of the cached targets (default 1).")
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), help="Cache root (default $KD_CACHE_DIR or ~/.cache/kd-pipeline)."
)
@click.option("--batch-size", type=int, help="Examples per teacher call (default 64).")
@click.option("--device", type=click.Choice(DEVICES), help="Execution provider: auto (CUDA if it loads), cpu or cuda.")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default 0: one per core).")
@click.option("--hidden", multiple=True, help="Intermediate tensor to cache as float16 (repeatable).")
@click.option("--logits-output", help="Teacher output that holds the logits (default: the first output).")
@click.option(
    "--shard-size", type=int, help="Examples per shard, the unit of resume (default 16384 / 512 for token teachers)."
)
@click.option("--postprocess", type=click.Choice(POSTPROCESS), help="Where top-k runs: torch, graph (in ONNX), auto.")
@click.option(
    "--pad-token-id", type=int, help="Id used to pad token inputs (default 0; padded positions are not cached)."
)
@click.option("--probe-positions", type=int, help="Positions for dense fidelity statistics (default 512).")
@click.option(
    "--target-format",
    type=click.Choice(TARGET_FORMATS),
    help="topk (default) or sampled (ids drawn from the teacher, with counts).",
)
@click.option("--samples", type=int, help="Sampled format: draws per position (default 64).")
@click.option("--sample-seed", type=int, help="Sampled format: seed of the draws (default 0).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or JSON file of these options.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@errors_to_click
def cache_teacher(config_file, quiet, **options) -> None:
    """Run a teacher over a dataset and cache its top-k soft targets. Prints the cache directory last."""
    from stages import cache_teacher as stage

    options["hidden"] = list(options["hidden"]) or None
    config = load_config(CacheTeacherConfig, config_file, options)
    result = stage.run(config, progress=not quiet, log=log)
    click.echo(str(result.path))


@main.command("inspect-teacher")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--all", "show_all", is_flag=True, help="List every intermediate tensor, not only named ones.")
@errors_to_click
def inspect_teacher(model, show_all) -> None:
    """Show a teacher's inputs, outputs, kind, and the tensors that --hidden can cache."""
    from stages.teacher import inspect, tensor_names

    info, proto, _ = inspect(model)
    click.echo(f"teacher   {model}  sha256 {info.sha256[:12]}")
    click.echo(f"kind      {info.kind}  classes/vocabulary {info.num_classes}")
    for i in info.inputs:
        click.echo(f"input     {i.name}  {i.dtype.__name__}  {list(i.shape)}")
    for o in proto.graph.output:
        click.echo(f"output    {o.name}")
    names = tensor_names(proto)
    shown = names if show_all else [n for n in names if not n.startswith(("val_", "_"))]
    click.echo(f"tensors   ({len(shown)} of {len(names)}; --all for every one)")
    for n in shown:
        click.echo(f"  {n}")


@main.command("train-student")
@click.option("--data", type=click.Path(), help="Training dataset (the one the caches were built from).")
@click.option("--cache", multiple=True, help="Cache path, key or key prefix; repeat once per teacher.")
@click.option(
    "--student", help="Student: mlp, cnn1d, transformer, causal-lm (family:key=value,...) or module:function."
)
@click.option("--method", type=click.Choice(METHODS), help="kd (default), ensemble (several caches) or progressive.")
@click.option("--alpha", type=float, help="Weight of the distillation term in [0, 1]; 0 = from scratch (default 0.5).")
@click.option("--temperature", type=float, help="Distillation temperature (default: the cache's T).")
@click.option("--epochs", type=int, help="Epochs of the logit stage (default 10).")
@click.option("--batch-size", type=int, help="Examples per step (default 64).")
@click.option("--lr", type=float, help="AdamW learning rate (default 1e-3).")
@click.option("--weight-decay", type=float, help="AdamW weight decay (default 0).")
@click.option(
    "--lr-schedule", type=click.Choice(LR_SCHEDULES), help="constant (default) or cosine decay to 0 over each stage."
)
@click.option("--warmup-steps", type=int, help="Linear warm-up steps at the start of each stage (default 0).")
@click.option("--seed", type=int, help="Seed: the same seed repeats the run (default 0).")
@click.option("--eval-data", type=click.Path(), help="Held-out dataset evaluated every epoch.")
@click.option("--eval-cache", help="The teacher's cache of --eval-data: adds agreement and KL to the teacher.")
@click.option("--test-data", type=click.Path(), help="Test dataset evaluated once after training (test_* metrics).")
@click.option("--test-cache", help="The teacher's cache of --test-data.")
@click.option("--top-k", type=int, help="Use only the first K cached ids per position (exact; default all).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where cache keys are looked up.")
@click.option("--weights", help="Ensemble weights, comma-separated, one per cache (default uniform).")
@click.option(
    "--ensemble-mode",
    type=click.Choice(["prob", "logit"]),
    help="prob: mix probabilities (default); logit: average logits.",
)
@click.option("--renormalize/--tail", default=None, help="KD within the top-k only, or with the tail bucket (default).")
@click.option("--layer-map", help="Progressive: STUDENT_LAYER=TEACHER_HIDDEN,... (default: spread evenly).")
@click.option(
    "--hidden-loss", type=click.Choice(["mse", "cosine"]), help="Progressive hidden-state loss (default mse)."
)
@click.option("--stage-epochs", type=int, help="Progressive: epochs per hidden-state stage (default 2).")
@click.option(
    "--freeze-earlier/--no-freeze-earlier", default=None, help="Progressive: freeze layers of earlier stages."
)
@click.option(
    "--truncate-vocab",
    is_flag=True,
    default=None,
    help="Student vocabulary wider than the teacher's: use its first V logits.",
)
@click.option("--buffer", type=int, help="Examples per shuffle window (default 8192).")
@click.option("--workers", type=int, help="DataLoader worker processes (default 0).")
@click.option("--device", type=click.Choice(DEVICES), help="Torch device for the student.")
@click.option("--threads", type=int, help="Torch CPU threads (default: one per core).")
@click.option("--no-onnx", "export_onnx", flag_value=False, default=None, help="Skip the student.onnx export.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run directory.")
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue the interrupted run in --out from its last checkpoint (its config.json fills the options).",
)
@click.option("--log-every", type=click.IntRange(min=1), help="Optimizer steps per metrics.csv row (default 10).")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    help="Optimizer steps per checkpoint (default 1000; also each epoch end).",
)
@click.option("--precision", type=click.Choice(PRECISIONS), help="Autocast of the student: fp32 (default), bf16, fp16.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Batches per optimizer step (default 1).")
@click.option("--max-grad-norm", type=float, help="Clip the gradients' global L2 norm to this (default 0: off).")
@click.option(
    "--tensorboard", is_flag=True, default=None, help="Also write TensorBoard event files (optional package)."
)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or JSON file of these options.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@errors_to_click
def train_student(config_file, quiet, **options) -> None:
    """Train a student from cached soft targets (KD, ensemble or progressive). Prints the run directory last."""
    from stages import train_student as stage

    options["cache"] = list(options["cache"]) or None
    if options["weights"] is not None:
        try:
            options["weights"] = [float(w) for w in options["weights"].split(",")]
        except ValueError as exc:
            raise click.UsageError(f"--weights {options['weights']!r}: give comma-separated numbers, e.g. 1,2") from exc
    if options["resume"] and not config_file and options["out"]:
        saved = Path(options["out"]) / run_dir.CONFIG
        config_file = str(saved) if saved.is_file() else None  # no saved run: train-student says so below
    config = load_config(TrainStudentConfig, config_file, options)
    stage.run(config, progress=not quiet, log=log)
    click.echo(config.out)


cli_catalog.register(main)  # caches, runs, query, report
