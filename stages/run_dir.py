"""The run directory of ``train-student --out``: its file names, writer, reader and status. Nobody else spells them.

    config.json             the resolved configuration (absolute paths, cache keys) and the world size (ranks),
                            written at start: a directory holding it is a run. It is a valid ``--config`` file
                            (the options sit under "config").
    metrics.csv             a "step" row every --log-every optimizer steps and an "epoch" row at each epoch's end
                            (epoch means and the eval figures), appended while the run trains
    checkpoints/step-N.pt   the exact training state every --checkpoint-every steps and at each epoch end (the last
                            few are kept; ``stages.checkpoint`` writes and reads them)
    tensorboard/            event files with the same scalars (--tensorboard)
    checkpoint.safetensors  the final weights;  student.onnx  the exported student
    hf/                     Hugging Face students: the transformers folder (save_pretrained)
    metrics.json            the final figures, written last: a run without it has not finished
    .lock                   held (flock) by the process that trains the run

Status: ``complete`` (metrics.json), ``running`` (a live process holds the lock), else ``interrupted`` (killed or
failed; the same command, or ``--resume``, continues from the last checkpoint).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from pathlib import Path

from stages.cache_write import write_json_atomic
from stages.errors import ConfigError

CONFIG = "config.json"
METRICS = "metrics.json"
ROWS = "metrics.csv"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WEIGHTS = "checkpoint.safetensors"
ONNX = "student.onnx"
HF = "hf"
LOCK = ".lock"
_FIRST = ("step", "epoch", "stage", "kind")  # metrics.csv's leading columns; the rest are floats
_TEXT = ("stage", "kind")

COMPLETE, RUNNING, INTERRUPTED = "complete", "running", "interrupted"


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def status(path: Path) -> str:
    if (path / METRICS).is_file():
        return COMPLETE
    return RUNNING if _locked(path) else INTERRUPTED


def _locked(path: Path) -> bool:
    """Whether a live process holds the run's lock (a killed one releases it with its file descriptors)."""
    if not (path / LOCK).is_file():
        return False
    with open(path / LOCK) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


class RunLock:
    """The training process's exclusive hold on a run directory, from setup until it exits."""

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self._fh = open(path / LOCK, "a")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise ConfigError(
                f"run directory {path} is being trained by another process right now; wait for it, stop it, "
                "or choose another --out"
            ) from None

    def release(self) -> None:
        self._fh.close()


def check_out(path: Path, overwrite: bool, resume: bool) -> bool:
    """Whether ``path`` holds an interrupted run to resume. Refuses, reading only, what may not be touched."""
    used = path.exists() and any(path.iterdir())
    if used and is_run(path) and status(path) == RUNNING:
        raise ConfigError(f"run directory {path} is being trained by another process right now; wait or stop it")
    if resume and not (used and is_run(path)):
        raise ConfigError(f"--resume: {path} holds no run to resume; drop --resume to start one there")
    if used:
        check_is_run(path, overwrite)
    if not used or overwrite:
        return False
    if status(path) == COMPLETE:
        raise ConfigError(
            f"run directory {path} holds a finished run; choose another --out, or pass --overwrite to replace it"
        )
    return True


def check_is_run(path, overwrite: bool) -> None:
    """Refuse a non-empty --out (local or on an object store) that holds no run: --overwrite never replaces it."""
    if not is_run(path):
        also = " (--overwrite replaces runs only, never other files)" if overwrite else ""
        raise ConfigError(f"{path} exists and holds files that are not a run (no {CONFIG}){also}; choose another --out")


def check_same_run(path: Path, config: dict, ignore: tuple[str, ...]) -> None:
    """An interrupted run resumes only under the options it started with (``ignore``: those that change nothing)."""
    saved = read_config(path)["config"]
    now = json.loads(json.dumps(config))  # compare as the file holds them (tuples as lists, and so on)
    differ = [k for k in now if k not in ignore and saved.get(k) != now[k]]
    if differ:
        detail = "; ".join(f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in differ)
        raise ConfigError(
            f"run directory {path} holds an interrupted run with other options ({detail}). Resume it with its own "
            f"options (--config {path / CONFIG}), or pass --overwrite to start over"
        )


def check_same_ranks(path: Path, world_size: int, batch_size: int) -> None:
    """An interrupted run resumes only on as many ranks as it started on: --batch-size is per rank, so another
    count would change the global batch (and with it the steps and the schedule) halfway through."""
    started = read_config(path).get("world_size")
    if started is None or started == world_size:  # a run recorded before config.json held its ranks: unknown
        return
    launch = "one process, without torchrun" if started == 1 else f"torchrun with {started} processes in all"
    raise ConfigError(
        f"run directory {path} was started on {started} rank(s) (global batch {started * batch_size}) and is being "
        f"resumed on {world_size} (global batch {world_size * batch_size}); resume it on {started} ({launch}), "
        "or pass --overwrite to start over"
    )


def read_config(path: Path) -> dict:
    """The saved record: {"config": {...}, "caches": [...], ...}. ConfigError when it is not one."""
    try:
        record = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path / CONFIG} cannot be read ({exc}); it is not a run this pipeline wrote") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{path / CONFIG} holds no 'config' table; it is not a run this pipeline wrote")
    return record


def write_config(path: Path, record: dict) -> None:
    write_json_atomic(record, path / CONFIG)


def read_metrics(path: Path) -> dict | None:
    """metrics.json, or None while the run has not finished."""
    return json.loads((path / METRICS).read_text()) if (path / METRICS).is_file() else None


def write_metrics(path: Path, metrics: dict) -> None:
    write_json_atomic(metrics, path / METRICS)


def read_rows(path: Path) -> list[dict]:
    """metrics.csv's rows, typed. A row torn by a kill (the file's last line, short of fields) is left out.

    Files written before per-step logging have no ``kind`` or ``step`` column: every row is an epoch row.
    """
    if not (path / ROWS).is_file():
        return []
    text = (path / ROWS).read_text()
    text = text[: text.rfind("\n") + 1]  # a last line without its newline was torn by a kill, whatever it holds
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        if None in row.values() or None in row:  # short or overlong: not a row this module wrote
            continue
        parsed: dict = {"kind": "epoch"}
        for k, v in row.items():
            if k in _TEXT:
                parsed[k] = v
            elif k in ("step", "epoch"):
                parsed[k] = int(v) if v else None
            else:
                parsed[k] = float(v) if v else None
        rows.append(parsed)
    return rows


def last_step(path: Path) -> int | None:
    """The last optimizer step metrics.csv logged (None before the first)."""
    steps = [row["step"] for row in read_rows(path) if row.get("step") is not None]
    return max(steps) if steps else None


def tensorboard_writer_class():
    """torch's SummaryWriter; ConfigError naming the optional package when it is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard; "
            "metrics.csv holds the same scalars)"
        ) from exc
    return SummaryWriter


class MetricsLog:
    """Appends rows to metrics.csv as training runs, each flushed at once so `runs list` and tails see it.

    The header is the union of the columns so far; a row bringing a new column (the first eval row, a new loss
    part) rewrites the file once, atomically, under the wider header. ``rows`` are the ones already there (a
    resumed run keeps those up to its checkpoint). ``tensorboard``: the same scalars as event files too, tagged
    ``kind/column`` at the row's step; events a resumed run logs again replace the earlier process's.
    """

    def __init__(self, path: Path, rows: list[dict] | None = None, tensorboard: bool = False):
        self.path = path / ROWS
        self.rows = list(rows or [])
        self.columns = list(dict.fromkeys([*_FIRST, *(k for row in self.rows for k in row)]))
        self._rewrite()
        last = max((row["step"] for row in self.rows if row.get("step") is not None), default=0)
        self.board = tensorboard_writer_class()(str(path / TENSORBOARD), purge_step=last + 1) if tensorboard else None

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.board is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self.board.add_scalar(f"{row['kind']}/{key}", value, row["step"])
            self.board.flush()
        if any(k not in self.columns for k in row):
            self.columns += [k for k in row if k not in self.columns]
            self._rewrite()
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns).writerow(row)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)
