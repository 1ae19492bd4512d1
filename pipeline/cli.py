"""The ``pipeline`` command line. Commands only parse options and hand off to a stage's ``run(config)``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline import cli_catalog
from pipeline.cli_base import errors_to_click, log, main
from stages import run_dir
from stages.config import (
    DEVICES,
    ENSEMBLE_MODES,
    HIDDEN_LOSSES,
    LR_SCHEDULES,
    METHODS,
    POSTPROCESS,
    PRECISIONS,
    TARGET_FORMATS,
    CacheTeacherConfig,
    TrainStudentConfig,
    load_config,
)
from stages.formats import ENCODINGS


def _config_option(config: type, *decls: str, **attrs: Any) -> Callable:
    """``click.option`` whose help shows the default of ``config``'s field, so no help string retypes it.

    Options themselves default to None ("not given"), so that a config file's value survives a flag left out;
    the field is named by the option's destination, or by its first flag name.
    """
    name = next((d for d in decls if d.isidentifier()), None)
    name = name or decls[0].split("/")[0].lstrip("-").replace("-", "_")
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    shown = None
    if isinstance(default, bool):
        if "/" in decls[0]:  # --on/--off: name the side that is the default
            on, off = decls[0].split("/")
            shown = (on if default else off).lstrip("-")
    elif default not in ("", []):  # an empty default means "not given"; the help says what that does
        shown = default
    if shown is not None:  # in click's own format; its show_default would put a text default in parentheses
        attrs["help"] = f"{attrs['help']}  [default: {shown}]"
    return click.option(*decls, **attrs)


_cache_option = functools.partial(_config_option, CacheTeacherConfig)
_train_option = functools.partial(_config_option, TrainStudentConfig)


@main.command("cache-teacher")
@_cache_option("--teacher", type=click.Path(dir_okay=False), help="ONNX teacher model.")
@_cache_option("--data", type=click.Path(), help="Dataset: a Parquet file or a directory of them (or s3://...).")
@_cache_option("--top-k", type=int, help="Ids cached per position; 0: all classes up to 32.")
@_cache_option("--temperature", type=float, help="Softmax temperature T of the cached targets.")
@_cache_option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Cache root, a directory or s3://bucket/prefix ($KD_CACHE_DIR, else ~/.cache/kd-pipeline).",
)
@_cache_option("--batch-size", type=int, help="Examples per teacher call, at most.")
@_cache_option(
    "--logits-budget-mb",
    type=int,
    help="MiB of float32 logits one teacher call may return; positions per call = budget / (4 V).",
)
@_cache_option("--device", type=click.Choice(DEVICES), help="Execution provider: auto (CUDA if it loads), cpu or cuda.")
@_cache_option("--threads", type=int, help="ONNX Runtime intra-op threads; 0: one per core.")
@_cache_option("--hidden", multiple=True, help="Intermediate tensor to cache as float16 (repeatable).")
@_cache_option("--logits-output", help="Teacher output that holds the logits; empty: the first output.")
@_cache_option(
    "--shard-size", type=int, help="Examples per shard, the unit of resume; 0: 16384, or 512 for token teachers."
)
@_cache_option(
    "--postprocess",
    type=click.Choice((*POSTPROCESS, "torch")),
    help="Where top-k runs: host (one pass over the logits on the CPU), graph (TopK in the ONNX graph), or "
    "auto (graph when CUDA really runs). torch: the old name of host.",
)
@_cache_option("--pad-token-id", type=int, help="Id used to pad token inputs (padded positions are not cached).")
@_cache_option("--probe-positions", type=int, help="Positions for dense fidelity statistics.")
@_cache_option(
    "--target-format",
    type=click.Choice(TARGET_FORMATS),
    help="topk, or sampled (ids drawn from the teacher, with counts).",
)
@_cache_option("--samples", type=int, help="Sampled format: draws per position.")
@_cache_option("--sample-seed", type=int, help="Sampled format: seed of the draws.")
@_cache_option(
    "--encoding",
    type=click.Choice(tuple(ENCODINGS)),
    help="Top-k ids and log-probs on disk: fp32 (exact), fp16 (~2e-6 KD-loss change), int8 (1-byte codes, ~2e-4).",
)
@_cache_option(
    "--top-p",
    type=float,
    help="Keep per position the fewest top ids whose probability reaches P (--top-k the most); 1: off.",
)
@_cache_option("--min-k", type=int, help="With --top-p: the fewest ids a position keeps.")
@_cache_option(
    "--num-workers", type=int, help="Launcher-free: independent jobs that split the shards (not under torchrun)."
)
@_cache_option("--worker-index", type=int, help="Launcher-free: this job's index, 0 .. num-workers - 1.")
@_cache_option("--dist-timeout", type=float, help="torchrun: seconds a rank waits for the others before failing.")
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
    from stages.teacher import can_generate, inspect, tensor_names

    info, proto, _ = inspect(model)
    click.echo(f"teacher   {model}  sha256 {info.sha256[:12]}")
    for f in info.external_data:
        click.echo(f"data      {f.location}  {f.bytes} bytes  sha256 {f.sha256[:12]}")
    click.echo(f"kind      {info.kind}  classes/vocabulary {info.num_classes}")
    for i in info.inputs:
        made = "  (made by cache-teacher when the dataset has no such column)" if can_generate(i.name) else ""
        click.echo(f"input     {i.name}  {i.dtype.__name__}  {list(i.shape)}{made}")
    for o in proto.graph.output:
        click.echo(f"output    {o.name}")
    names = tensor_names(proto)
    shown = names if show_all else [n for n in names if not n.startswith(("val_", "_"))]
    click.echo(f"tensors   ({len(shown)} of {len(names)}; --all for every one)")
    for n in shown:
        click.echo(f"  {n}")


@main.command("train-student")
@_train_option("--data", type=click.Path(), help="Training dataset (the one the caches were built from).")
@_train_option("--cache", multiple=True, help="Cache path, key or key prefix; repeat once per teacher.")
@_train_option(
    "--student", help="Student: mlp, cnn1d, transformer, causal-lm (family:key=value,...) or module:function."
)
@_train_option(
    "--inputs",
    help="Float columns a vector student reads, comma-separated, concatenated in this order; empty: the teacher's.",
)
@_train_option("--method", type=click.Choice(METHODS), help="kd, ensemble (several caches) or progressive.")
@_train_option("--alpha", type=float, help="Weight of the distillation term in [0, 1]; 0: from scratch.")
@_train_option("--temperature", type=float, help="Distillation temperature; 0: the cache's T.")
@_train_option("--epochs", type=int, help="Epochs of the logit stage.")
@_train_option(
    "--batch-size", type=int, help="Examples per step, per rank under torchrun (global batch: this x ranks)."
)
@_train_option("--lr", type=float, help="AdamW learning rate.")
@_train_option("--weight-decay", type=float, help="AdamW weight decay.")
@_train_option("--lr-schedule", type=click.Choice(LR_SCHEDULES), help="constant, or cosine decay to 0 over each stage.")
@_train_option("--warmup-steps", type=int, help="Linear warm-up steps at the start of each stage.")
@_train_option("--seed", type=int, help="Seed: the same seed repeats the run.")
@_train_option(
    "--labelled-only",
    is_flag=True,
    default=None,
    help="Train on the rows with a label only (skip a transfer set's rows); caches still cover every row.",
)
@_train_option("--eval-data", type=click.Path(), help="Held-out dataset evaluated every epoch.")
@_train_option("--eval-cache", help="The teacher's cache of --eval-data: adds agreement and KL to the teacher.")
@_train_option("--test-data", type=click.Path(), help="Test dataset evaluated once after training (test_* metrics).")
@_train_option("--test-cache", help="The teacher's cache of --test-data.")
@_train_option("--top-k", type=int, help="Use only the first K cached ids per position (exact); 0: all.")
@_train_option("--cache-dir", type=click.Path(file_okay=False), help="Where cache keys are looked up.")
@_train_option("--weights", help="Ensemble weights, comma-separated, one per cache; none: uniform.")
@_train_option(
    "--ensemble-mode",
    type=click.Choice(ENSEMBLE_MODES),
    help="prob: mix probabilities; logit: average logits.",
)
@_train_option("--renormalize/--tail", default=None, help="KD within the top-k only, or with the tail bucket.")
@_train_option("--layer-map", help="Progressive: STUDENT_LAYER=TEACHER_HIDDEN,...; empty: spread evenly.")
@_train_option("--hidden-loss", type=click.Choice(HIDDEN_LOSSES), help="Progressive hidden-state loss.")
@_train_option("--stage-epochs", type=int, help="Progressive: epochs per hidden-state stage.")
@_train_option(
    "--freeze-earlier/--no-freeze-earlier", default=None, help="Progressive: freeze layers of earlier stages."
)
@_train_option(
    "--truncate-vocab",
    is_flag=True,
    default=None,
    help="Student vocabulary wider than the teacher's: use its first V logits.",
)
@_train_option("--buffer", type=int, help="Examples per shuffle window.")
@_train_option("--workers", type=int, help="DataLoader worker processes.")
@_train_option("--device", type=click.Choice(DEVICES), help="Torch device for the student.")
@_train_option("--threads", type=int, help="Torch CPU threads; 0: torch's default.")
@_train_option("--no-onnx", "export_onnx", flag_value=False, default=None, help="Skip the student.onnx export.")
@_train_option("--overwrite", is_flag=True, default=None, help="Replace an existing run directory.")
@_train_option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue the interrupted run in --out from its last checkpoint (its config.json fills the options).",
)
@_train_option("--log-every", type=click.IntRange(min=1), help="Optimizer steps per metrics.csv row.")
@_train_option(
    "--checkpoint-every", type=click.IntRange(min=1), help="Optimizer steps per checkpoint (and each epoch end)."
)
@_train_option("--precision", type=click.Choice(PRECISIONS), help="Autocast of the student's forward.")
@_train_option("--grad-accum", type=click.IntRange(min=1), help="Batches per optimizer step.")
@_train_option("--max-grad-norm", type=float, help="Clip the gradients' global L2 norm to this; 0: no clipping.")
@_train_option(
    "--tensorboard", is_flag=True, default=None, help="Also write TensorBoard event files (optional package)."
)
@_train_option("--out", type=click.Path(file_okay=False), help="Run directory (or s3://bucket/prefix).")
@_train_option("--dist-timeout", type=float, help="torchrun: seconds a rank waits for the others before failing.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or JSON file of these options.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@errors_to_click
def train_student(config_file, quiet, **options) -> None:
    """Train a student from cached soft targets (KD, ensemble or progressive). Prints the run directory last."""
    from stages import train_student as stage

    options["cache"] = list(options["cache"]) or None
    if options["inputs"] is not None:
        options["inputs"] = [name.strip() for name in options["inputs"].split(",") if name.strip()]
    if options["weights"] is not None:
        try:
            options["weights"] = [float(w) for w in options["weights"].split(",")]
        except ValueError as exc:
            raise click.UsageError(f"--weights {options['weights']!r}: give comma-separated numbers, e.g. 1,2") from exc
    if options["resume"] and not config_file and options["out"]:
        saved = Path(options["out"]) / run_dir.CONFIG
        if not saved.is_file():
            raise click.ClickException(
                f"--resume: {options['out']} holds no run to resume (no {run_dir.CONFIG}); drop --resume to start one"
            )
        config_file = str(saved)
    config = load_config(TrainStudentConfig, config_file, options)
    stage.run(config, progress=not quiet, log=log)
    click.echo(config.out)


@main.command("export-teacher")
@click.argument("src")
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "sequence-classification", "feature-extraction"]),
    default="causal-lm",
    show_default=True,
    help="What the graph returns: next-token logits, class logits, or the last hidden states.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Export folder (created if missing).")
@click.option("--opset", type=int, default=0, help="ONNX opset (default: the exporter's).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Weight type.")
@click.option(
    "--no-optimize", "optimize", flag_value=False, default=True, help="Skip the graph clean-up (faster export)."
)
@errors_to_click
def export_teacher(src, **options) -> None:
    """Export a local Hugging Face model folder or .gguf file to an ONNX teacher. Prints the .onnx path last."""
    from stages import export_teacher as stage

    config = load_config(stage.ExportTeacherConfig, None, {"src": src, **options})
    result = stage.run(config, log=log)
    check = result.card["check"]
    log(f"ORT vs torch: max |delta logit| {check['max_abs_diff']:.3g} (logit scale {check['logit_scale']:.3g})")
    click.echo(str(result.onnx_path))


@main.command("prepare-data")
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--tokenizer", required=True, help="The teacher's tokenizer: its export folder or a tokenizer.json.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Parquet file to write.")
@click.option("--max-length", type=click.IntRange(min=2), help="Tokens per row: packed length or truncation (512).")
@click.option("--pack", is_flag=True, default=None, help="Join documents with end-of-text and cut fixed lengths.")
@click.option("--text-field", help="JSONL/CSV/Parquet field holding the text (default text).")
@click.option("--label-field", help="Field holding the class label (name or integer).")
@click.option("--chat", is_flag=True, default=None, help="Records hold chat 'messages'; loss on assistant tokens only.")
@click.option("--split", help="Split documents, e.g. train=0.9,val=0.05,test=0.05: one file per split.")
@click.option("--seed", type=int, help="Seed of the split's shuffle (default 0).")
@errors_to_click
def prepare_data(src, **options) -> None:
    """Tokenise text, JSONL, chat, CSV, Parquet or datasets folders into a dataset. Prints the output path last."""
    from stages import prepare_data as stage

    config = load_config(stage.PrepareDataConfig, None, {"src": list(src), **options})
    result = stage.run(config, log=log)
    click.echo(str(result.path))


@main.command("generate")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens to add.")
@click.option("--teacher", is_flag=True, help="Sample the run's ONNX teacher instead of the student.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user turn with the tokenizer's chat template.")
@errors_to_click
def generate(run, prompt, max_new_tokens, teacher, chat) -> None:
    """Print a greedy continuation of --prompt by a causal-LM student (hf:) or, with --teacher, its teacher."""
    from stages import generate as stage

    click.echo(stage.run(run, prompt, max_new_tokens=max_new_tokens, teacher=teacher, chat=chat))


cli_catalog.register(main)  # caches, runs, query, report
