"""Stage two end to end: run directories, repeatability, methods, progressive stages, and bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_format as fmt
from stages import cache_teacher, run_dir, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.trainer import Trainer
from tests import teachers

QUIET = {"progress": False, "log": lambda m: None}


def _cache(setup: dict, data=None, **overrides) -> Path:
    config = CacheTeacherConfig(
        teacher=str(setup["teacher"]), data=str(data or setup["data"]), cache_dir=str(setup["cache_dir"]), **overrides
    )
    return cache_teacher.run(config, **QUIET).path


def _config(setup: dict, out: Path, **overrides) -> TrainStudentConfig:
    base = dict(
        data=str(setup["data"]),
        out=str(out),
        cache_dir=str(setup["cache_dir"]),
        student="mlp:hidden=16x16",
        epochs=2,
        batch_size=32,
        export_onnx=False,
    )
    return TrainStudentConfig(**(base | overrides))


def test_kd_run_directory_is_complete(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=4, temperature=2.0)
    eval_cache = _cache(classifier_setup, top_k=4, temperature=2.0)  # same data doubles as the eval set here
    out = tmp_path / "run"
    metrics = train_student.run(
        _config(
            classifier_setup,
            out,
            cache=[cache.name],
            alpha=0.7,
            eval_data=str(classifier_setup["data"]),
            eval_cache=str(eval_cache),
            export_onnx=True,
        ),
        **QUIET,
    )
    for name in ("metrics.json", "metrics.csv", "config.json", "checkpoint.safetensors", "student.onnx"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert 0 <= saved["test_accuracy"] <= 1 and 0 <= saved["test_agreement"] <= 1 and saved["test_kl"] >= 0
    assert saved["onnx_max_abs_diff"] < 1e-3
    config = json.loads((out / "config.json").read_text())
    assert config["caches"][0]["key"] == cache.name and config["config"]["temperature"] == 2.0
    rows = run_dir.read_rows(out)  # 10 steps per epoch, a "step" row every 10 steps, an "epoch" row per epoch
    assert [(r["kind"], r["step"], r["epoch"]) for r in rows] == [
        ("step", 10, 1),
        ("epoch", 10, 1),
        ("step", 20, 2),
        ("epoch", 20, 2),
    ]
    assert all(r["eval_accuracy"] is not None for r in rows if r["kind"] == "epoch")
    assert config["config"]["data"] == str(classifier_setup["data"].resolve())
    assert config["config"]["cache"] == [str(cache.resolve())] and config["config"]["out"] == str(out.resolve())


def test_same_seed_same_run_and_different_seed_differs(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=3)
    runs = [
        train_student.run(_config(classifier_setup, tmp_path / f"r{i}", cache=[str(cache)], seed=s), **QUIET)
        for i, s in enumerate([1, 1, 2])
    ]
    assert runs[0]["train_total"] == runs[1]["train_total"]
    assert runs[0]["train_total"] != runs[2]["train_total"]


def test_scratch_needs_no_cache_and_alpha_one_needs_no_labels(classifier_setup, tmp_path) -> None:
    scratch = train_student.run(
        _config(classifier_setup, tmp_path / "s", alpha=0.0, eval_data=str(classifier_setup["data"])), **QUIET
    )
    assert "test_accuracy" in scratch and scratch["train_ce"] > 0

    unlabelled = teachers.write_vectors(tmp_path / "transfer.parquet", classifier_setup["x"])  # no label column
    cache = _cache(classifier_setup, data=unlabelled, top_k=5)
    run = train_student.run(
        _config(classifier_setup, tmp_path / "t", data=str(unlabelled), cache=[str(cache)], alpha=1.0), **QUIET
    )
    assert run["train_ce"] == 0.0 and run["train_kd"] > 0


def test_partially_labelled_rows_train_on_kd_alone(classifier_setup, tmp_path) -> None:
    labels = np.where(np.arange(300) % 3 == 0, np.arange(300) % 10, -1).astype(object)
    labels[labels == -1] = None
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(classifier_setup["data"]).set_column(2, "label", pa.array(list(labels), type=pa.int64()))
    path = tmp_path / "partial.parquet"
    pq.write_table(table, path)
    cache = _cache(classifier_setup, data=path, top_k=5)
    run = train_student.run(
        _config(classifier_setup, tmp_path / "p", data=str(path), cache=[str(cache)], alpha=0.5), **QUIET
    )
    assert run["train_ce"] > 0 and run["train_kd"] > 0


def test_labelled_only_on_a_cache_of_every_row_trains_like_the_labelled_rows_alone(classifier_setup, tmp_path) -> None:
    """One cache over labelled + unlabelled rows; `--labelled-only` equals caching and training the labelled rows.

    One batch holds every labelled row (batch_size > 100), so the shuffle order cannot make the two runs differ.
    """
    s = classifier_setup
    labelled = teachers.write_vectors(tmp_path / "labelled.parquet", s["x"][:100], np.arange(100) % 10)
    mixed = teachers.write_vectors(
        tmp_path / "mixed.parquet", s["x"], [i % 10 if i < 100 else None for i in range(300)]
    )
    runs = []
    for name, data, extra in (("alone", labelled, ()), ("subset", mixed, ("--labelled-only",))):
        cache = _cache(s, data=data, top_k=10)
        out = tmp_path / name
        args = ["--cache", str(cache), "--alpha", "0.5", "--batch-size", "128", "--epochs", "3", "--out", str(out)]
        result = _invoke(s, tmp_path, *args, *extra, data=data)
        assert result.exit_code == 0, result.output
        runs.append(json.loads((out / "metrics.json").read_text()))
    assert runs[0]["train_total"] > 0
    assert np.isclose(runs[0]["train_total"], runs[1]["train_total"], rtol=1e-5)
    assert json.loads((tmp_path / "subset" / "config.json").read_text())["config"]["labelled_only"] is True


def test_ensemble_of_two_caches_and_logit_mode(classifier_setup, tmp_path) -> None:
    a = _cache(classifier_setup, top_k=3)
    other = teachers.make_classifier(tmp_path / "clf2.onnx", seed=5)
    assert other is not None
    b = cache_teacher.run(
        CacheTeacherConfig(
            teacher=str(tmp_path / "clf2.onnx"),
            data=str(classifier_setup["data"]),
            cache_dir=str(classifier_setup["cache_dir"]),
            top_k=5,
        ),
        **QUIET,
    ).path
    for mode in ("prob", "logit"):
        run = train_student.run(
            _config(
                classifier_setup,
                tmp_path / mode,
                cache=[str(a), str(b)],
                method="ensemble",
                ensemble_mode=mode,
                weights=[1.0, 3.0],
            ),
            **QUIET,
        )
        assert run["train_kd"] > 0 and run["cache_keys"] == [a.name, b.name]


def test_progressive_stages_move_the_right_parameters(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=3, hidden=["hidden"])
    config = _config(
        classifier_setup,
        tmp_path / "prog",
        cache=[str(cache)],
        method="progressive",
        layer_map="0=hidden,1=hidden",
        stage_epochs=1,
        freeze_earlier=True,
    )
    trainer = Trainer(config, progress=False, log=lambda m: None)
    trainer.setup()
    assert trainer.hidden_map == [(0, "hidden"), (1, "hidden")]

    def snapshot():
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    before = snapshot()
    trainer.hidden_stage(0, "hidden")
    after_first = snapshot()
    assert changed(before, after_first) == {"layers.0.0.weight", "layers.0.0.bias"}

    trainer.hidden_stage(1, "hidden")  # layer 0 is frozen now: only layer 1 moves
    after_second = snapshot()
    assert changed(after_first, after_second) == {"layers.1.0.weight", "layers.1.0.bias"}

    trainer.logit_stage()
    assert "head.weight" in changed(after_second, snapshot())
    assert [row["stage"] for row in trainer.history] == ["hidden:0=hidden", "hidden:1=hidden", "logits", "logits"]


def test_causal_lm_student_on_token_cache(token_setup, tmp_path) -> None:
    cache = _cache(token_setup, top_k=8)
    eval_cache = _cache(token_setup, top_k=8)
    run = train_student.run(
        TrainStudentConfig(
            data=str(token_setup["data"]),
            cache=[str(cache)],
            out=str(tmp_path / "lm"),
            cache_dir=str(token_setup["cache_dir"]),
            student="causal-lm:layers=1,d_model=16,heads=2",
            epochs=1,
            batch_size=8,
            alpha=0.5,
            eval_data=str(token_setup["data"]),
            eval_cache=str(eval_cache),
            export_onnx=True,
        ),
        **QUIET,
    )
    assert run["test_perplexity"] > 1 and 0 <= run["test_agreement"] <= 1 and run["onnx_max_abs_diff"] < 1e-3


def test_cross_entropy_only_lm_needs_no_cache(token_setup, tmp_path) -> None:
    """A CE-only baseline LM: its width is the held-out caches' teacher vocabulary, else the largest id + 1."""
    eval_cache = _cache(token_setup, top_k=8)
    base = dict(
        data=str(token_setup["data"]),
        cache_dir=str(token_setup["cache_dir"]),
        student="causal-lm:layers=1,d_model=16,heads=2",
        epochs=1,
        batch_size=8,
        alpha=0.0,
        export_onnx=False,
    )
    scored = train_student.run(
        TrainStudentConfig(
            **base, out=str(tmp_path / "ce"), eval_data=str(token_setup["data"]), eval_cache=str(eval_cache)
        ),
        **QUIET,
    )
    assert (
        scored["train_ce"] > 0
        and "train_kd" not in scored
        and 0 <= scored["test_agreement"] <= 1
        and scored["test_kl"] > 0
    )
    bare = Trainer(TrainStudentConfig(**base, out=str(tmp_path / "bare")), progress=False, log=lambda m: None)
    bare.setup()
    assert bare.token_level and bare.inputs.num_outputs == max(max(seq) for seq in token_setup["seqs"]) + 1


def test_cosine_schedule_with_warmup(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=3)
    config = _config(
        classifier_setup, tmp_path / "cos", cache=[str(cache)], lr=0.01, lr_schedule="cosine", warmup_steps=3, epochs=3
    )
    trainer = Trainer(config, progress=False, log=lambda m: None)
    trainer.setup()
    optimizer, schedule = trainer._optimizer(list(trainer.model.parameters()), config.epochs)
    steps = sum(trainer.train_loader.count_batches(epoch) for epoch in (1, 2, 3))  # the stage's epochs are 1..3
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert np.allclose(lrs[:4], [0.01 / 3, 0.02 / 3, 0.01, 0.01], rtol=1e-12, atol=0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:])) and 0 < lrs[-1] < 0.01 * 0.01
    trainer.train()
    assert [round(row["lr"], 12) for row in trainer.history][-1] == 0.0  # a stage ends at lr 0
    constant = _config(classifier_setup, tmp_path / "const", cache=[str(cache)], lr=0.01)
    assert train_student.run(constant, **QUIET)["train_total"] > 0
    assert {row["lr"] for row in run_dir.read_rows(tmp_path / "const")} == {0.01}


# -- bad input: a clear message and a non-zero exit -----------------------------------------------------------


def _invoke(setup: dict, tmp_path: Path, *extra: str, data=None):
    args = [
        "train-student",
        "--data",
        str(data or setup["data"]),
        "--student",
        "mlp:hidden=8",
        "--epochs",
        "1",
        "--cache-dir",
        str(setup["cache_dir"]),
        "--out",
        str(tmp_path / "bad_run"),
        "--no-onnx",
        "--quiet",
        *extra,
    ]
    return CliRunner().invoke(main, args)


def _fails(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    for word in words:
        assert word in result.output, result.output


def test_bad_inputs(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    cache = _cache(s, top_k=3)
    _fails(_invoke(s, tmp_path, "--cache", "ffffffffffff"), "no cache matches 'ffffffffffff'")
    _fails(_invoke(s, tmp_path, "--cache", ""), "the cache reference is empty")
    (tmp_path / "not-a-cache").mkdir()
    _fails(_invoke(s, tmp_path, "--cache", str(tmp_path / "not-a-cache")), "holds no cache", "request.json")
    _fails(_invoke(s, tmp_path, "--cache", str(cache), "--alpha", "1.5"), "alpha: 1.5")
    _fails(_invoke(s, tmp_path, "--cache", str(cache), "--temperature", "-1"), "temperature: -1")
    _fails(_invoke(s, tmp_path, "--cache", str(cache), "--method", "progressive"), "holds none", "--hidden")
    _fails(_invoke(s, tmp_path, "--alpha", "0.5"), "needs at least one --cache")
    _fails(_invoke(s, tmp_path, "--cache", str(cache), "--lr-schedule", "linear"), "'linear' is not one of")
    _fails(_invoke(s, tmp_path, "--alpha", "0", "--warmup-steps", "-1"), "warmup_steps: -1")

    unlabelled = teachers.write_vectors(tmp_path / "nolabel.parquet", s["x"])
    unlabelled_cache = _cache(s, data=unlabelled, top_k=3)
    _fails(
        _invoke(s, tmp_path, "--cache", str(unlabelled_cache), "--alpha", "0.5", data=unlabelled),
        "needs labels",
        "--alpha 1",
    )
    _fails(_invoke(s, tmp_path, "--alpha", "0", data=unlabelled), "needs labels", "--cache and --alpha 1")

    other = teachers.write_vectors(tmp_path / "other.parquet", s["x"][::-1].copy(), np.arange(300) % 10)
    _fails(_invoke(s, tmp_path, "--cache", str(cache), data=other), "another dataset")
    _fails(
        _invoke(s, tmp_path, "--cache", str(cache), "--cache", str(unlabelled_cache), "--method", "ensemble"),
        "another dataset",
    )

    custom = tmp_path / "wide.py"
    custom.write_text(
        "import torch\n"
        "class Wide(torch.nn.Module):\n"
        "    def __init__(self, d):\n        super().__init__()\n        self.f = torch.nn.Linear(d, 12)\n"
        "    def forward(self, inputs):\n        return self.f(inputs['x'])\n"
        "def make(num_outputs, input_dim):\n    return Wide(input_dim)\n"
        "def bad(num_outputs, input_dim):\n    return torch.nn.Linear(input_dim, num_outputs)\n"
    )
    _fails(_invoke(s, tmp_path, "--cache", str(cache), "--student", f"{custom}:make"), "(2, 12)", "[2, 10]")
    _fails(
        _invoke(s, tmp_path, "--cache", str(cache), "--student", f"{custom}:bad"),
        "failed on a probe batch",
        "dict of input tensors",
    )

    shard = next(cache.glob("shard-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    _fails(_invoke(s, tmp_path, "--cache", str(cache)), "sha256", shard.name)
    (cache / fmt.MANIFEST).unlink()
    _fails(_invoke(s, tmp_path, "--cache", str(cache)), "incomplete")


def test_existing_run_directory_is_not_overwritten_silently(classifier_setup, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    result = CliRunner().invoke(
        main, ["train-student", "--data", str(classifier_setup["data"]), "--alpha", "0", "--out", str(out), "--quiet"]
    )
    _fails(result, "holds files that are not a run", "choose another --out")
    assert (out / "metrics.json").read_text() == "{}"
    (out / "config.json").write_text('{"config": {}}')  # a finished run of this pipeline
    again = CliRunner().invoke(
        main, ["train-student", "--data", str(classifier_setup["data"]), "--alpha", "0", "--out", str(out), "--quiet"]
    )
    _fails(again, "holds a finished run", "--overwrite")
    assert (out / "metrics.json").read_text() == "{}"


def test_test_set_is_evaluated_once_apart_from_the_eval_set(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=3)
    half = teachers.write_vectors(tmp_path / "half.parquet", classifier_setup["x"][:150], np.arange(150) % 10)
    run = train_student.run(
        _config(
            classifier_setup,
            tmp_path / "r",
            cache=[str(cache)],
            eval_data=str(classifier_setup["data"]),
            test_data=str(half),
            top_k=2,
        ),
        **QUIET,
    )
    assert "eval_accuracy" in run and "test_accuracy" in run
    csv_rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert "test_" not in csv_rows[0], "the test set is not looked at during training"


def test_failed_setup_with_overwrite_keeps_the_old_run(classifier_setup, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"test_accuracy": 0.5}')
    (out / "config.json").write_text('{"config": {}}')
    result = CliRunner().invoke(
        main,
        [
            "train-student",
            "--data",
            str(classifier_setup["data"]),
            "--cache",
            "nonexistent",
            "--cache-dir",
            str(classifier_setup["cache_dir"]),
            "--out",
            str(out),
            "--overwrite",
            "--quiet",
        ],
    )
    _fails(result, "no cache matches")
    assert (out / "metrics.json").read_text() == '{"test_accuracy": 0.5}'
