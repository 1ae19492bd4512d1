"""A training run's outputs, in the order they are written.

``RunOutputs``: where the run directory is (``--out``, or a local staging directory for an object store), the
record in config.json (and the checks that a resumed run is the same run), metrics.csv's rows as training goes, and
the final files: weights, the transformers folder, the ONNX export, metrics.json last, then the upload.
``stages.run_dir`` owns the directory's file names. ``LossMeter`` sums the losses into metrics.csv's rows.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from stages import cache_format as fmt
from stages import checkpoint, distributed, run_dir, storage
from stages.config import TrainStudentConfig, to_dict
from stages.errors import ConfigError
from stages.export import export_onnx
from stages.hf_students import HFStudent

# Options that do not change what a run computes: an interrupted run resumes whatever they are now.
_NOT_COMPARED = ("out", "overwrite", "resume", "log_every", "checkpoint_every", "tensorboard", "device", "threads")
_NOT_COMPARED += ("export_onnx", "cache_dir")  # cache_dir only resolves the caches, recorded by path
_NOT_COMPARED += ("dist_timeout",)


NO_TEST_FIGURES = "no test figures (--test-data, with labels or a --test-cache, gives them)"


class RunOutputs:
    """The run directory of one process. Rank 0 alone (``main``) checks, locks, writes and resumes it."""

    def __init__(self, config: TrainStudentConfig, main: bool):
        self.config = config
        self.main = main
        self.lock: run_dir.RunLock | None = None
        self._staging: tempfile.TemporaryDirectory | None = None  # where a run bound for an object store trains
        self.rows: run_dir.MetricsLog | None = None  # metrics.csv (and TensorBoard), open from ``start`` on
        self.new = False  # this process started the run in self.out (not resumed it)

    def open(self) -> tuple[bool, bool]:
        """(resuming, replacing) --out. A run on an object store trains in a local staging directory (self.out)
        and is uploaded when it finishes, metrics.json last: one there is complete or absent, so it never resumes.
        """
        c = self.config
        self.target = storage.location(c.out)
        if isinstance(self.target, Path):
            self.out = self.target = self.target.resolve()
            if not self.main:
                return False, False
            resuming = run_dir.check_out(self.out, c.overwrite, c.resume)
            return resuming, not resuming and self.out.exists() and any(self.out.iterdir())
        self.out = self.target  # the other ranks write nothing
        if not self.main:
            return False, False
        self.target.mkdir(parents=True, exist_ok=True)  # the bucket exists: checked before any work
        if c.resume:
            raise ConfigError(
                f"--resume: {self.target} is on an object store, where a run is uploaded only once it finished, "
                "so there is nothing to resume; train to a local --out to resume runs"
            )
        replace = self.target.exists() and any(self.target.iterdir())
        if replace:
            run_dir.check_is_run(self.target, c.overwrite)
        if replace and not c.overwrite:
            raise ConfigError(
                f"run directory {self.target} exists and is not empty; choose another --out or pass --overwrite"
            )
        self._staging = tempfile.TemporaryDirectory(prefix="kd-run-")
        self.out = Path(self._staging.name)
        return False, replace

    def record(
        self,
        caches: list[fmt.Cache],
        temperature: float,
        hidden_map: list[tuple[int, str]],
        parameters: int,
        world_size: int,
    ) -> dict:
        """config.json: the resolved configuration (absolute paths, caches by path), the caches' identities and the
        ranks the run trains on (``world_size``: with the per-rank batch, the global batch)."""
        c = self.config

        def absolute(path: str) -> str:
            return storage.display(path) if path else ""  # an object-store URI stays as given

        def cache_path(ref: str) -> str:
            return str(fmt.resolve_cache(ref, c.cache_dir).resolve()) if ref else ""

        module, colon, rest = c.student.partition(":")
        student = absolute(module) + colon + rest if module.endswith(".py") else c.student
        resolved = to_dict(c) | {
            "data": absolute(c.data),
            "out": str(self.target),
            "cache": [str(cache.path.resolve()) for cache in caches],
            "eval_data": absolute(c.eval_data),
            "eval_cache": cache_path(c.eval_cache),
            "test_data": absolute(c.test_data),
            "test_cache": cache_path(c.test_cache),
            "cache_dir": absolute(c.cache_dir),
            "student": student,
            "temperature": temperature,
            "layer_map": ",".join(f"{layer}={name}" for layer, name in hidden_map),
            "overwrite": False,  # how this command treated --out, not what the run is: never replayed
            "resume": False,
        }
        identities = [
            {
                "key": cache.key,
                "path": str(cache.path.resolve()),
                "teacher": cache.manifest["teacher"]["name"],
                "teacher_sha256": cache.manifest["teacher"]["sha256"],
                "top_k": cache.top_k,
                "temperature": cache.temperature,
            }
            for cache in caches
        ]
        return {"config": resolved, "caches": identities, "student_parameters": parameters, "world_size": world_size}

    def check_same_run(self, record: dict) -> None:
        """A resumed run goes on only under the options it started with, on as many ranks."""
        run_dir.check_same_run(self.out, record["config"], ignore=_NOT_COMPARED)
        run_dir.check_same_ranks(self.out, record["world_size"], self.config.batch_size)

    def replace(self) -> None:
        """Remove the run --overwrite replaces: only once every check passed, so a failed setup leaves it as it was."""
        storage.rmtree(self.target)

    def start(self, record: dict, resuming: bool) -> dict | None:
        """Lock the directory, write config.json (or load the checkpoint to resume) and open metrics.csv.

        Returns the checkpoint resumed from, or None for a new run."""
        self.lock = run_dir.RunLock(self.out)
        state = checkpoint.load_last(self.out) if resuming else None
        if not resuming:
            run_dir.write_config(self.out, record)
            self.new = True
        kept = run_dir.read_rows(self.out)[: state["rows"]] if state else []  # those logged up to the checkpoint
        self.rows = run_dir.MetricsLog(self.out, kept, tensorboard=self.config.tensorboard)
        return state

    def save(self, model: nn.Module, metrics: dict, tokenizer_source: str | None, example: dict | None, log) -> None:
        """The final files: weights (and a transformers folder), the ONNX export traced with ``example`` (when
        --export-onnx; its round-trip error joins ``metrics``), metrics.json last, then the upload."""
        save_model(model, str(self.out / run_dir.WEIGHTS))
        if isinstance(model, HFStudent):  # also a transformers folder: from_pretrained, generate
            if not model.save_pretrained(self.out / run_dir.HF, tokenizer_source):
                log(f"note: {self.out / run_dir.HF} has no tokenizer; copy the teacher's tokenizer files into it")
        if example is not None:
            device = next(model.parameters()).device
            small = {k: v[:4].cpu() for k, v in example.items()}
            model.eval()
            metrics["onnx_max_abs_diff"] = export_onnx(model.cpu(), small, self.out / run_dir.ONNX)
            model.to(device)
        run_dir.write_metrics(self.out, metrics)
        if self._staging is not None:  # the run is complete: upload it, metrics.json last
            storage.upload_tree(self.out, self.target, last=run_dir.METRICS, skip=(run_dir.LOCK,))
        figures = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test_"))
        log(f"run saved to {self.target}: {figures or NO_TEST_FIGURES}")

    def discard(self) -> None:
        """Remove the run this process started and refused before its first step (closed first): nothing was
        trained, so nothing is lost, and the same --out takes the corrected command without --overwrite."""
        if self.main and self.new and isinstance(self.target, Path) and run_dir.is_run(self.out):
            shutil.rmtree(self.out, ignore_errors=True)

    def close(self) -> None:
        """Let go of the run directory (also after a failure: the run is then interrupted, and resumable)."""
        if self.rows is not None:
            self.rows.close()
        if self.lock is not None:
            self.lock.release()
        if self._staging is not None:  # uploaded by save, or a failed run: nothing there to resume
            self._staging.cleanup()


class LossMeter:
    """The loss sums behind metrics.csv's rows: the current epoch's (``epoch``) and those since the last "step" row
    (``window``). Each is a plain dict (``_accumulator``), checkpointed as it is."""

    def __init__(self, token_level: bool):
        self.token_level = token_level  # throughput in tokens (target positions) as well as examples
        self.epoch = _accumulator()
        self.window = _accumulator()

    def add(self, parts: dict[str, float], examples: int, positions: int) -> None:
        for acc in (self.epoch, self.window):
            for key, value in parts.items():
                acc["sums"][key] = acc["sums"].get(key, 0.0) + value
            acc["batches"] += 1
            acc["examples"] += examples
            acc["positions"] += positions

    def speed(self) -> str:
        """Throughput since the last step row, for the progress bar."""
        seconds = max(time.perf_counter() - self.window["t0"], 1e-9)
        unit = "tokens" if self.token_level else "examples"
        return f"{self.window['positions' if self.token_level else 'examples'] / seconds:,.0f} {unit}/s"

    def step_row(self, step: int, epoch: int, stage: str, lr: float, elapsed: float) -> dict:
        """A "step" row: the loss means since the last one, the learning rate, throughput and elapsed time."""
        seconds = max(time.perf_counter() - self.window["t0"], 1e-9)
        row = {
            "step": step,
            "epoch": epoch,
            "stage": stage,
            "kind": "step",
            **_means(self.window["sums"], self.window["batches"]),
            "lr": lr,
            "examples_per_s": self.window["examples"] / seconds,
            "elapsed": elapsed,
        }
        if self.token_level:
            row["tokens_per_s"] = self.window["positions"] / seconds
        self.window = _accumulator()
        return row

    def epoch_row(self, group: distributed.Group | None, step: int, epoch: int, stage: str, lr: float, seconds: float):
        """An "epoch" row: the loss means over every rank's batches of the epoch, and its training ``seconds``
        since the last checkpoint (the time before it is counted in the sums). Starts the next epoch's sums."""
        acc = self.epoch
        sums, batches = distributed.sum_over_ranks(group, acc["sums"], acc["batches"], "averaging the losses")
        row = {
            "step": step,
            "epoch": epoch,
            "stage": stage,
            "kind": "epoch",
            **_means(sums, batches),
            "seconds": acc["seconds"] + seconds,
            "lr": lr,
        }
        self.epoch = _accumulator()
        return row


def _accumulator() -> dict:
    """Loss-part sums over batches, with the examples and target positions they covered, since ``t0``."""
    return {"sums": {}, "batches": 0, "examples": 0, "positions": 0, "seconds": 0.0, "t0": time.perf_counter()}


def _means(sums: dict[str, float], batches: int) -> dict[str, float]:
    return {f"train_{key}": value / max(batches, 1) for key, value in sums.items()}
