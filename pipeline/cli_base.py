"""What every command shares: the ``pipeline`` group, the error boundary, and logging.

The boundary sits on the group, so every command gets it: a ``PipelineError`` (bad input, named and explained)
becomes its one-line message and exit 1; any other exception is a bug of ours, reported as one "internal error"
line that names the file holding the full traceback (``pipeline --debug ...`` prints it instead).
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import tempfile
import traceback
from pathlib import Path

import click

from stages.errors import PipelineError

_PASS_THROUGH = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit)
# What an interrupted command leaves behind, and how to carry on; other commands leave nothing to resume.
_AFTER_INTERRUPT = {
    "cache-teacher": " (cache-teacher keeps its complete shards and resumes after them when run again)",
    "train-student": " (run the same command again, or train-student --resume --out RUN_DIR, to continue from the "
    "run's last checkpoint; --overwrite starts it over)",
}


def errors_to_click(fn):
    """PipelineError -> exit 1 with the message; Ctrl-C -> exit 130. Kept per command for direct callers."""

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


def _write_traceback(exc: BaseException) -> Path:
    """The full traceback, with the command line, in a file of its own under the temp directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"kd-pipeline-error-{stamp}-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write("command: " + " ".join(sys.argv) + "\n\n")
        fh.write("".join(traceback.format_exception(exc)))
    return Path(name)


def internal_error_message(exc: BaseException, debug_hint: bool = True) -> str:
    """One line for an exception we did not expect: what it was, where its traceback went, what to do."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    path = _write_traceback(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory ({what}); lower --batch-size (or the memory budget) and re-run. Traceback: {path}"
    hint = "; `pipeline --debug ...` prints it" if debug_hint else ""
    return f"internal error ({what}); this is a bug in kd-pipeline. Full traceback in {path}{hint}"


class _Boundary(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from exc
        except BrokenPipeError:
            # The reader of stdout left early (`| head`): stop quietly, as a command killed by SIGPIPE would.
            # stdout goes to /dev/null so the interpreter's last flush cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + 13)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(internal_error_message(exc)) from exc


def log(message: str) -> None:
    click.echo(message, err=True)  # progress and notes on stderr: stdout's last line is the result


@click.group(cls=_Boundary)
@click.option("--debug", is_flag=True, help="Print the full traceback of an unexpected error instead of a file name.")
@click.version_option(package_name="kd-pipeline")
def main(debug: bool) -> None:
    """Run a teacher once, cache its soft targets, distil many students from the cache."""
