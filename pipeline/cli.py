"""The ``pipeline`` command line. Commands only parse options and hand off to a stage's ``run(config)``."""

from __future__ import annotations

import functools
import sys

import click

from pipeline.config import DEVICES, POSTPROCESS, CacheTeacherConfig, load_config
from pipeline.errors import PipelineError


def _errors_to_click(fn):
    """PipelineError (bad input, named and explained) -> exit 1 with the message; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("interrupted; completed shards are kept and the next run resumes after them", err=True)
            sys.exit(130)

    return wrapper


def _log(message: str) -> None:
    click.echo(message, err=True)  # progress and notes on stderr: stdout's last line is the result


@click.group()
@click.version_option(package_name="kd-pipeline")
def main() -> None:
    """Run a teacher once, cache its soft targets, distil many students from the cache."""


@main.command("cache-teacher")
@click.option("--teacher", type=click.Path(dir_okay=False), help="ONNX teacher model.")
@click.option("--data", type=click.Path(), help="Dataset: a Parquet file or a directory of them.")
@click.option("--top-k", type=int, help="Ids cached per position (default: all classes up to 32).")
@click.option("--temperature", type=float, help="Softmax temperature T of the cached targets (default 1).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache root (default $KD_CACHE_DIR or ~/.cache/kd-pipeline).")
@click.option("--batch-size", type=int, help="Examples per teacher call (default 64).")
@click.option("--device", type=click.Choice(DEVICES), help="Execution provider: auto (CUDA if it loads), cpu or cuda.")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default 0: one per core).")
@click.option("--hidden", multiple=True, help="Intermediate tensor to cache as float16 (repeatable).")
@click.option("--logits-output", help="Teacher output that holds the logits (default: the first output).")
@click.option("--shard-size", type=int, help="Examples per shard, the unit of resume (default 16384 / 512 for token teachers).")
@click.option("--postprocess", type=click.Choice(POSTPROCESS), help="Where top-k runs: torch, graph (in ONNX), auto.")
@click.option("--pad-token-id", type=int, help="Id used to pad token inputs (default 0; padded positions are not cached).")
@click.option("--probe-positions", type=int, help="Positions for dense fidelity statistics (default 512).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or JSON file of these options.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_errors_to_click
def cache_teacher(config_file, quiet, **options) -> None:
    """Run a teacher over a dataset and cache its top-k soft targets. Prints the cache directory last."""
    from stages import cache_teacher as stage

    options["hidden"] = list(options["hidden"]) or None
    config = load_config(CacheTeacherConfig, config_file, options)
    result = stage.run(config, progress=not quiet, log=_log)
    click.echo(str(result.path))


@main.command("inspect-teacher")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--all", "show_all", is_flag=True, help="List every intermediate tensor, not only named ones.")
@_errors_to_click
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
