"""What the results scripts share: running a ``pipeline`` command in-process, and their BENCHMARKS.md sections.

The scripts run as ``python benchmarks/X.py``, so this directory is on their ``sys.path``: ``from common import ...``.
BENCHMARKS.md is written by several scripts, each owning one section: text whose first line is
``<!-- NAME:start -->`` and whose last line is ``<!-- NAME:end -->``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import time
from pathlib import Path

MARKER = re.compile(r"<!-- ([\w-]+):(start|end) -->")


def write_section(path: Path, section: str) -> None:
    """Replace the section with the same markers in ``path`` (or append it; create the file when missing).

    Every other section stays byte for byte; the file is replaced atomically, so a crash leaves the old one.
    """
    lines = section.strip("\n").splitlines()
    first, last = (MARKER.fullmatch(line.strip()) for line in (lines[0], lines[-1])) if lines else (None, None)
    if not (first and last and first[1] == last[1] and (first[2], last[2]) == ("start", "end")):
        raise ValueError("a section must start with <!-- NAME:start --> and end with <!-- NAME:end --> (same NAME)")
    start, end, body = first[0], last[0], "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pipeline(args: list[str], log_path: Path) -> tuple[str, float, str]:
    """Run one ``pipeline`` command in-process: stdout's last line, wall seconds, stderr (all of it in log_path).

    Failures raise as the command's ``click`` exception (its message names the problem); the log is written anyway.
    """
    from pipeline.cli import main as pipeline_cli

    log_path.parent.mkdir(parents=True, exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            pipeline_cli.main(args, prog_name="pipeline", standalone_mode=False)
        finally:
            log_path.write_text("pipeline " + shlex.join(args) + "\n" + out.getvalue() + err.getvalue())
    return out.getvalue().strip().splitlines()[-1], time.perf_counter() - t0, err.getvalue()
