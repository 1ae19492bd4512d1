"""What every command shares: the ``pipeline`` group, error handling at the boundary, and logging."""

from __future__ import annotations

import functools
import sys

import click

from stages.errors import PipelineError

# What an interrupted command leaves behind, and how to carry on; other commands leave nothing to resume.
_AFTER_INTERRUPT = {
    "cache-teacher": " (cache-teacher keeps its complete shards and resumes after them when run again)",
    "train-student": " (train-student saves a run only when training ends, so this run has no metrics.json; "
    "run the same command again, with --overwrite if --out is not empty, to start it over)",
}


def errors_to_click(fn):
    """PipelineError (bad input, named and explained) -> exit 1 with the message; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            command = click.get_current_context().info_name
            click.echo(f"interrupted{_AFTER_INTERRUPT.get(command, '')}", err=True)
            sys.exit(130)

    return wrapper


def log(message: str) -> None:
    click.echo(message, err=True)  # progress and notes on stderr: stdout's last line is the result


@click.group()
@click.version_option(package_name="kd-pipeline")
def main() -> None:
    """Run a teacher once, cache its soft targets, distil many students from the cache."""
