"""The trainer as a long-running job: exact resume after a kill, live metrics, configs that round-trip, precision."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.catalog import Catalog
from pipeline.cli import main
from stages import cache_format as fmt
from stages import cache_teacher, checkpoint, run_dir, train_student
from stages import trainer as trainer_module
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.errors import ConfigError
from stages.trainer import Trainer

QUIET = {"progress": False, "log": lambda m: None}
TIMING = {"seconds", "elapsed", "examples_per_s", "tokens_per_s", "train_seconds"}  # wall clock: never equal
ROOT = Path(__file__).resolve().parents[1]


def _cache(setup: dict, **overrides) -> Path:
    config = CacheTeacherConfig(
        teacher=str(setup["teacher"]), data=str(setup["data"]), cache_dir=str(setup["cache_dir"]), **overrides
    )
    return cache_teacher.run(config, **QUIET).path


def _config(setup: dict, out: Path, cache: Path, **overrides) -> TrainStudentConfig:
    """Dropout draws from torch's generator and eval runs every epoch: a resume must restore both exactly."""
    base = dict(
        data=str(setup["data"]),
        cache=[str(cache)],
        out=str(out),
        cache_dir=str(setup["cache_dir"]),
        eval_data=str(setup["data"]),
        student="mlp:hidden=16x16,dropout=0.2",
        epochs=3,
        batch_size=32,
        buffer=100,
        lr_schedule="cosine",
        warmup_steps=4,
        log_every=2,
        checkpoint_every=4,
        threads=1,
        export_onnx=False,  # the export costs seconds; the tests that stop inside it turn it on
    )
    return TrainStudentConfig(**(base | overrides))


def _outcome(out: Path) -> tuple[bytes, dict, list[dict]]:
    """What must not depend on an interruption: final weights (bytes), final metrics and logged rows, less timing."""
    metrics = {k: v for k, v in run_dir.read_metrics(out).items() if k not in TIMING}
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in run_dir.read_rows(out)]
    return (out / run_dir.WEIGHTS).read_bytes(), metrics, rows


class Interrupt(Exception):
    """Stands in for Ctrl-C or a crash at a chosen moment of an in-process run."""


def _fail_on_call(target, name: str, call: int, monkeypatch, before: bool = True) -> None:
    """Make ``target.name`` raise Interrupt on its ``call``-th call (before running it, or right after)."""
    original = getattr(target, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if before and len(calls) == call:
            raise Interrupt(name)
        result = original(*args, **kwargs)
        if not before and len(calls) == call:
            raise Interrupt(name)
        return result

    monkeypatch.setattr(target, name, wrapper)


def test_interrupted_runs_resume_to_identical_weights_and_metrics(classifier_setup, tmp_path, monkeypatch) -> None:
    cache = _cache(classifier_setup, top_k=4, temperature=2.0)
    train_student.run(_config(classifier_setup, tmp_path / "reference", cache), **QUIET)
    reference = _outcome(tmp_path / "reference")
    assert [r["kind"] for r in reference[2]].count("epoch") == 3 and len(reference[2]) > 3 + 10

    points = {  # where the first process stops: mid-epoch between checkpoints, after a checkpoint, at the end
        "step": (torch.optim.AdamW, "step", 7, True),
        "checkpoint": (checkpoint, "save", 3, False),
        "eval": (trainer_module, "evaluate", 2, True),
        "final metrics": (run_dir, "write_metrics", 1, True),
    }
    for name, (target, attr, call, before) in points.items():
        out = tmp_path / name
        with monkeypatch.context() as patch:
            _fail_on_call(target, attr, call, patch, before)
            with pytest.raises(Interrupt):
                train_student.run(_config(classifier_setup, out, cache), **QUIET)
        assert run_dir.status(out) == run_dir.INTERRUPTED
        train_student.run(_config(classifier_setup, out, cache), **QUIET)  # the same command again resumes
        assert _outcome(out) == reference, name


def test_progressive_run_resumes_inside_a_hidden_stage_and_after_one(classifier_setup, tmp_path, monkeypatch) -> None:
    """Stages, their projections, the frozen set and each stage's optimizer come back from the checkpoint."""
    cache = _cache(classifier_setup, top_k=4, hidden=["hidden"])
    progressive = dict(method="progressive", layer_map="0=hidden,1=hidden", stage_epochs=1, freeze_earlier=True)
    progressive |= dict(epochs=1, eval_data="")
    train_student.run(_config(classifier_setup, tmp_path / "reference", cache, **progressive), **QUIET)
    reference = _outcome(tmp_path / "reference")
    assert [r["stage"] for r in reference[2] if r["kind"] == "epoch"] == [
        "hidden:0=hidden",
        "hidden:1=hidden",
        "logits",
    ]
    for call in (4, 3):  # step 12 (inside stage 2, after its projection was built), then the end of stage 1
        out = tmp_path / f"stopped-{call}"
        with monkeypatch.context() as patch:
            _fail_on_call(checkpoint, "save", call, patch, before=False)
            with pytest.raises(Interrupt):
                train_student.run(_config(classifier_setup, out, cache, **progressive), **QUIET)
        train_student.run(_config(classifier_setup, out, cache, **progressive), **QUIET)
        assert _outcome(out) == reference, call


_CHILD = """
import json, os, signal, sys
import torch
from stages import checkpoint, train_outputs, train_student
from stages.config import TrainStudentConfig
point, count = sys.argv[2], int(sys.argv[3])
calls = []
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "step":  # SIGKILL inside the optimizer step number `count`
    original = torch.optim.AdamW.step
    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            die()
        return original(self, *args, **kwargs)
    torch.optim.AdamW.step = step
elif point == "checkpoint":  # SIGKILL with checkpoint number `count` written to its temp name, not yet renamed
    original = checkpoint.os.replace
    def replace(src, dst):
        calls.append(str(src).endswith(".pt.tmp"))
        if calls[-1] and sum(calls) == count:
            die()
        return original(src, dst)
    checkpoint.os.replace = replace
elif point == "export":
    train_outputs.export_onnx = die
train_student.run(TrainStudentConfig(**json.loads(sys.argv[1])), progress=False, log=lambda m: None)
"""


def _kill_and_resume(setup: dict, out: Path, cache: Path, point: str, count: int, **overrides) -> None:
    """Train in a child that SIGKILLs itself at ``point`` (no cleanup runs), then run the same config again here."""
    config = _config(setup, out, cache, **overrides)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(config.__dict__), point, str(count)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, (point, child.stderr[-2000:])
    assert run_dir.status(out) == run_dir.INTERRUPTED  # the lock died with the process
    if point == "checkpoint":
        assert list((out / run_dir.CHECKPOINTS).glob("*.tmp")), "the kill left a checkpoint half-written"
    train_student.run(config, **QUIET)
    assert not list((out / run_dir.CHECKPOINTS).glob("*.tmp")) and len(checkpoint.paths(out)) == checkpoint.KEEP


def test_kill_9_during_a_checkpoint_write_then_resume_is_bitwise_identical(classifier_setup, tmp_path) -> None:
    """The default suite's real SIGKILL; the slow sweep below kills at random steps and inside the export too."""
    cache = _cache(classifier_setup, top_k=4, temperature=2.0)
    train_student.run(_config(classifier_setup, tmp_path / "reference", cache), **QUIET)
    count = random.Random(13).randrange(2, 8)
    _kill_and_resume(classifier_setup, tmp_path / "killed", cache, "checkpoint", count)
    assert _outcome(tmp_path / "killed") == _outcome(tmp_path / "reference"), count


@pytest.mark.slow
def test_kill_9_sweep_including_the_final_export(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=4, temperature=2.0)
    train_student.run(_config(classifier_setup, tmp_path / "reference", cache, export_onnx=True), **QUIET)
    reference = _outcome(tmp_path / "reference")
    steps = run_dir.read_metrics(tmp_path / "reference")["steps"]
    chooser = random.Random(7)
    points = [("step", chooser.randrange(2, steps)) for _ in range(4)] + [("checkpoint", 1), ("checkpoint", 8)]
    for point, count in points + [("export", 1)]:
        out = tmp_path / f"{point}-{count}"
        _kill_and_resume(classifier_setup, out, cache, point, count, export_onnx=True)
        assert _outcome(out) == reference, (point, count)


def test_rows_appear_while_training_and_runs_list_shows_the_running_run(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=4)
    out = tmp_path / "runs" / "live"
    seen = []

    def watch(message: str) -> None:  # the trainer notes each epoch's end: look at the directory from outside
        if message.startswith("step "):
            catalog = Catalog(classifier_setup["cache_dir"], tmp_path / "runs")
            (entry,) = catalog.runs
            seen.append((entry.status, entry.last_step, len(run_dir.read_rows(out)), run_dir.read_metrics(out)))

    train_student.run(_config(classifier_setup, out, cache, export_onnx=False), progress=True, log=watch)
    assert [s[:2] for s in seen] == [("running", 10), ("running", 20), ("running", 30)]
    assert all(rows > 0 and metrics is None for _, _, rows, metrics in seen)
    saved = run_dir.read_config(out)
    assert saved["config"]["data"] == str(Path(classifier_setup["data"]).resolve())
    assert saved["caches"][0]["key"] == cache.name
    (entry,) = Catalog(classifier_setup["cache_dir"], tmp_path / "runs").runs
    assert entry.status == "complete" and entry.last_step == 30
    step_rows = [r for r in run_dir.read_rows(out) if r["kind"] == "step"]
    assert [r["step"] for r in step_rows] == list(range(2, 31, 2))
    assert step_rows[0]["lr"] > 0 and step_rows[-1]["lr"] == 0.0  # cosine, over the stage's exact step count
    assert all(r["examples_per_s"] > 0 and r["train_total"] > 0 and r["elapsed"] > 0 for r in step_rows)


def test_run_config_and_cache_request_round_trip_through_config(classifier_setup, tmp_path, monkeypatch) -> None:
    """Relative paths on the first command; the records repeat the run and the cache from another directory."""
    monkeypatch.chdir(classifier_setup["data"].parent)
    made = CliRunner().invoke(
        main,
        ["cache-teacher", "--teacher", "clf.onnx", "--data", "vec.parquet", "--cache-dir", "cache", "--top-k", "3"],
    )
    assert made.exit_code == 0, made.output
    cache = Path(made.output.strip().splitlines()[-1]).resolve()
    args = ["--data", "vec.parquet", "--cache", cache.name[:8], "--cache-dir", "cache", "--student", "mlp:hidden=8"]
    args += ["--epochs", "2", "--eval-data", "vec.parquet", "--no-onnx", "--quiet", "--threads", "1"]
    first = CliRunner().invoke(main, ["train-student", *args, "--out", "runs/x"])
    assert first.exit_code == 0, first.output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    saved = cache / fmt.REQUEST
    again = CliRunner().invoke(main, ["cache-teacher", "--config", str(saved)])
    assert again.exit_code == 0 and Path(again.output.strip().splitlines()[-1]) == cache, again.output
    x = classifier_setup["data"].parent / "runs" / "x"
    second = CliRunner().invoke(main, ["train-student", "--config", str(x / run_dir.CONFIG), "--out", "y", "--quiet"])
    assert second.exit_code == 0, second.output
    assert _outcome(x)[1:] == _outcome(elsewhere / "y")[1:] and _outcome(x)[0] == _outcome(elsewhere / "y")[0]


def test_finished_runs_are_kept_and_resumes_must_match(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=4)
    out = tmp_path / "run"
    config = _config(classifier_setup, out, cache, epochs=1, export_onnx=False)
    train_student.run(config, **QUIET)
    with pytest.raises(ConfigError, match="holds a finished run.*--overwrite"):
        train_student.run(config, **QUIET)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        train_student.run(_config(classifier_setup, tmp_path / "empty", cache, resume=True), **QUIET)

    (out / run_dir.METRICS).unlink()  # now it reads as interrupted after its last epoch
    with pytest.raises(ConfigError, match=r"other options \(lr: 0.001 there, 0.01 now\).*--config"):
        train_student.run(_config(classifier_setup, out, cache, epochs=1, lr=0.01, export_onnx=False), **QUIET)
    record = run_dir.read_config(out)
    assert record["world_size"] == 1
    run_dir.write_config(out, record | {"world_size": 2})  # as if torchrun had started it on 2 ranks
    refused = CliRunner().invoke(main, ["train-student", "--resume", "--out", str(out), "--quiet"])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "started on 2 rank(s) (global batch 64) and is being resumed on 1 (global batch 32)" in refused.output
    assert "resume it on 2 (torchrun with 2 processes in all), or pass --overwrite" in refused.output
    run_dir.write_config(out, record)
    resumed = CliRunner().invoke(main, ["train-student", "--resume", "--out", str(out), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert run_dir.status(out) == run_dir.COMPLETE


def test_grad_accum_matches_a_larger_batch_and_clipping_bounds_the_norm(classifier_setup, tmp_path) -> None:
    """Two batches of 16 per step = one batch of 32 (the loader's 32-batches are its 16-batches in pairs)."""
    cache = _cache(classifier_setup, top_k=4)
    plain = dict(student="mlp:hidden=16x16", export_onnx=False, eval_data="", buffer=8192)
    big = train_student.run(_config(classifier_setup, tmp_path / "big", cache, **plain), **QUIET)
    small = train_student.run(
        _config(classifier_setup, tmp_path / "acc", cache, batch_size=16, grad_accum=2, **plain), **QUIET
    )
    assert big["steps"] == small["steps"] == 30
    a, b = load_file(tmp_path / "big" / run_dir.WEIGHTS), load_file(tmp_path / "acc" / run_dir.WEIGHTS)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        train_student.run(_config(classifier_setup, tmp_path / "clip", cache, max_grad_norm=0.05, **plain), **QUIET)
    finally:
        handle.remove()
    assert len(norms) == 30 and max(norms) <= 0.05 * (1 + 1e-5)


def test_bf16_runs_end_to_end_with_the_forward_in_bf16(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=4)
    trainer = Trainer(
        _config(classifier_setup, tmp_path / "bf16", cache, precision="bf16", epochs=2, export_onnx=True), **QUIET
    )
    dtypes = set()
    try:
        trainer.setup()
        trainer.model.head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
        trainer.train()
        metrics = trainer.save()
    finally:
        trainer.close()
    assert dtypes == {torch.bfloat16}
    assert (
        0 < metrics["train_total"] < 10 and 0 <= metrics["test_accuracy"] <= 1 and metrics["onnx_max_abs_diff"] < 1e-3
    )


def test_tensorboard_writes_events_or_names_the_missing_package(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=4)
    config = _config(classifier_setup, tmp_path / "tb", cache, tensorboard=True, epochs=1, export_onnx=False)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            train_student.run(config, **QUIET)
        assert not (tmp_path / "tb").exists()  # refused before any work
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_student.run(config, **QUIET)
    events = EventAccumulator(str(tmp_path / "tb" / run_dir.TENSORBOARD)).Reload()
    rows = run_dir.read_rows(tmp_path / "tb")
    for kind, column in (("step", "train_total"), ("epoch", "eval_accuracy")):
        logged = [(e.step, pytest.approx(e.value)) for e in events.Scalars(f"{kind}/{column}")]
        assert logged == [(r["step"], r[column]) for r in rows if r["kind"] == kind]


def test_token_run_logs_tokens_per_second_and_bars_count_exact_steps(token_setup, tmp_path, monkeypatch) -> None:
    cache = _cache(token_setup, top_k=8)
    bars = []

    class Bar(trainer_module.tqdm):
        def close(self) -> None:
            if not self.disable:  # tqdm closes itself again on deletion, disabled by then
                bars.append((self.desc, self.total, self.n))
            super().close()

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    config = TrainStudentConfig(
        data=str(token_setup["data"]),
        cache=[str(cache)],
        out=str(tmp_path / "lm"),
        cache_dir=str(token_setup["cache_dir"]),
        student="causal-lm:layers=1,d_model=16,heads=2",
        epochs=2,
        batch_size=8,
        buffer=16,
        grad_accum=2,
        log_every=1,
        threads=1,
        export_onnx=False,
    )
    metrics = train_student.run(config, progress=True, log=lambda m: None)
    assert bars == [("logits", metrics["steps"], metrics["steps"])]  # one bar for the stage, its exact step count
    steps = [r for r in run_dir.read_rows(tmp_path / "lm") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, metrics["steps"] + 1))
    assert all(r["tokens_per_s"] > r["examples_per_s"] > 0 for r in steps)  # sequences hold 2..12 tokens


@pytest.mark.slow
def test_resume_with_dataloader_workers_is_identical(classifier_setup, tmp_path, monkeypatch) -> None:
    """Two DataLoader workers: the resumed epoch's batches continue the workers' interrupted turn order."""
    cache = _cache(classifier_setup, top_k=4, shard_size=70)
    train_student.run(_config(classifier_setup, tmp_path / "reference", cache, workers=2), **QUIET)
    with monkeypatch.context() as patch:
        _fail_on_call(checkpoint, "save", 1, patch, before=False)  # step 4 of epoch 1: mid-epoch, mid-window
        with pytest.raises(Interrupt):
            train_student.run(_config(classifier_setup, tmp_path / "stopped", cache, workers=2), **QUIET)
    train_student.run(_config(classifier_setup, tmp_path / "stopped", cache, workers=2), **QUIET)
    assert _outcome(tmp_path / "stopped") == _outcome(tmp_path / "reference")
