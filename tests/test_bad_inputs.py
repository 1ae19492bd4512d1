"""The bad-input matrix: every mistake a user makes ends in exit 1 and one message naming it, never a traceback.

Each case builds its own bad input from a shared set of good files, runs one command in-process, and checks the
same four things: exit status 1 through the CLI's error boundary (a named PipelineError, not the boundary's
"internal error" fallback), the words that name the problem, no traceback in the output, and nothing left that
looks complete (no manifest.json for a cache, no metrics.json for a run).
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_format as fmt
from tests import teachers

ROWS, CLASSES = 60, 10


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """Good files every case starts from: a classifier and a token teacher, their datasets, and their caches."""
    root = tmp_path_factory.mktemp("base")
    x = np.random.default_rng(1).normal(size=(ROWS, 8)).astype(np.float32)
    files = {
        "clf": root / "clf.onnx",
        "tok": root / "tok.onnx",
        "vec": teachers.write_vectors(root / "vec.parquet", x, np.arange(ROWS) % CLASSES),
        "seq": teachers.write_sequences(root / "seq.parquet", teachers.random_sequences(20, 50)),
        "x": x,
        "caches": root / "caches",
    }
    teachers.make_classifier(files["clf"], classes=CLASSES)
    teachers.make_token_teacher(files["tok"])
    files["vec_cache"] = Path(_ok("cache-teacher", "--teacher", files["clf"], "--data", files["vec"], *_at(files)))
    files["seq_cache"] = Path(_ok("cache-teacher", "--teacher", files["tok"], "--data", files["seq"], *_at(files)))
    return files


def _at(base: dict) -> list:
    return ["--cache-dir", base["caches"], "--quiet", "--top-k", "5"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(*args) -> str:
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def _own_cache(base: dict, tmp: Path, which: str = "vec_cache") -> Path:
    """A private copy of a good cache, for a case that damages it."""
    copy = tmp / "caches" / base[which].name
    shutil.copytree(base[which], copy)
    return copy


def _edited_top_k(base: dict, tmp: Path) -> Path:
    """A cache copy whose manifest says top_k 3 where its shards hold 5 (the issue's hand edit)."""
    cache = _own_cache(base, tmp)
    manifest = json.loads((cache / fmt.MANIFEST).read_text())
    manifest["top_k"] = 3
    (cache / fmt.MANIFEST).write_text(json.dumps(manifest))
    return cache


def _truncated_shard(base: dict, tmp: Path) -> tuple[Path, Path]:
    """A cache copy whose first shard is cut to 100 bytes."""
    cache = _own_cache(base, tmp)
    shard = next(cache.glob("shard-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])
    return cache, shard


def _train(tmp: Path, data: Path, *extra) -> list:
    return ["train-student", "--data", data, "--out", tmp / "run", "--epochs", "1", "--quiet", *extra]


# ---- the cases: each returns (argv, words the message must contain); `tmp` is the case's own directory ----------


def not_onnx(base, tmp):
    (tmp / "model.onnx").write_text("not a model")
    return ["cache-teacher", "--teacher", tmp / "model.onnx", "--data", base["vec"], "--cache-dir", tmp / "c"], [
        "is not an ONNX model"
    ]


def missing_external_data(base, tmp):
    model = teachers.save_with_external_data(base["clf"], tmp / "ext.onnx", {"w1": "weights.bin"})
    (tmp / "weights.bin").unlink()
    return ["cache-teacher", "--teacher", model, "--data", base["vec"], "--cache-dir", tmp / "c"], ["weights.bin"]


def missing_dataset(base, tmp):
    return ["cache-teacher", "--teacher", base["clf"], "--data", tmp / "nope.parquet", "--cache-dir", tmp / "c"], [
        "dataset not found"
    ]


def dataset_without_the_teachers_input(base, tmp):
    return ["cache-teacher", "--teacher", base["clf"], "--data", base["seq"], "--cache-dir", tmp / "c"], [
        "needs input(s) ['x']"
    ]


def empty_dataset(base, tmp):
    teachers.write_vectors(tmp / "empty.parquet", base["x"][:0], np.arange(0))
    return ["cache-teacher", "--teacher", base["clf"], "--data", tmp / "empty.parquet", "--cache-dir", tmp / "c"], [
        "has no rows"
    ]


def both_label_columns(base, tmp):
    table = pq.read_table(base["vec"])
    pq.write_table(table.append_column("labels", table.column("label")), tmp / "both.parquet")
    return ["cache-teacher", "--teacher", base["clf"], "--data", tmp / "both.parquet", "--cache-dir", tmp / "c"], [
        "label",
        "labels",
    ]


def top_k_above_classes(base, tmp):
    args = ["cache-teacher", "--teacher", base["clf"], "--data", base["vec"], "--cache-dir", tmp / "c", "--top-k"]
    return [*args, CLASSES + 1], [f"top_k {CLASSES + 1}", f"<= {CLASSES}"]


def cache_teacher_on_missing_cuda(base, tmp):
    if torch.cuda.is_available():
        pytest.skip("checks the message given when CUDA cannot be loaded")
    return ["cache-teacher", "--teacher", base["clf"], "--data", base["vec"], "--cache-dir", tmp / "c", "--device"] + [
        "cuda"
    ], ["--device cuda", "--device cpu"]


def edited_manifest_verify(base, tmp):
    cache = _edited_top_k(base, tmp)
    return ["caches", "verify", cache.name, "--cache-dir", tmp / "caches"], ["manifest.json"]


def edited_manifest_train(base, tmp):
    cache = _edited_top_k(base, tmp)
    return _train(tmp, base["vec"], "--cache", cache), ["manifest.json", "changed"]


def truncated_shard_train(base, tmp):
    cache, shard = _truncated_shard(base, tmp)
    return _train(tmp, base["vec"], "--cache", cache), [shard.name]


def truncated_shard_verify(base, tmp):
    cache, shard = _truncated_shard(base, tmp)
    return ["caches", "verify", cache.name, "--cache-dir", tmp / "caches"], [shard.name]


def cache_of_another_dataset(base, tmp):
    teachers.write_vectors(tmp / "other.parquet", base["x"] + 1, np.arange(ROWS) % CLASSES)
    return _train(tmp, tmp / "other.parquet", "--cache", base["vec_cache"]), ["another dataset"]


def unknown_cache_key(base, tmp):
    return _train(tmp, base["vec"], "--cache", "0123abcd", "--cache-dir", base["caches"]), ["no cache matches"]


def label_outside_the_teachers_classes(base, tmp):
    labels = np.arange(ROWS) % CLASSES
    labels[4] = CLASSES + 2
    teachers.write_vectors(tmp / "bad.parquet", base["x"], labels)
    cache = _ok(
        "cache-teacher", "--teacher", base["clf"], "--data", tmp / "bad.parquet", *_at({"caches": tmp / "caches"})
    )
    return _train(tmp, tmp / "bad.parquet", "--cache", cache), [f"label {CLASSES + 2}"]


def student_family_that_does_not_fit(base, tmp):
    return _train(tmp, base["seq"], "--cache", base["seq_cache"], "--student", "mlp"), ["mlp", "causal-lm"]


def unknown_student_input(base, tmp):
    return _train(tmp, base["vec"], "--alpha", "0", "--inputs", "pixels"), ["pixels", "['x']"]


def empty_dataset_train(base, tmp):
    teachers.write_vectors(tmp / "empty.parquet", base["x"][:0], np.arange(0))
    return _train(tmp, tmp / "empty.parquet", "--alpha", "0"), ["has no rows"]


def train_on_missing_cuda(base, tmp):
    if torch.cuda.is_available():
        pytest.skip("checks the message given when torch has no CUDA")
    return _train(tmp, base["vec"], "--alpha", "0", "--device", "cuda"), ["--device cuda", "--device cpu"]


def unknown_config_key(base, tmp):
    (tmp / "run.toml").write_text('data = "x.parquet"\nlearning_rate = 0.1\n')
    return ["train-student", "--config", tmp / "run.toml", "--out", tmp / "run"], ["unknown key 'learning_rate'"]


def _cache_teacher(tmp, teacher, data, *extra) -> list:
    return ["cache-teacher", "--teacher", teacher, "--data", data, "--cache-dir", tmp / "c", "--quiet", *extra]


def _token_rows(tmp, rows: dict) -> Path:
    """A token dataset from {column: [row lists]} (ids 0..n-1)."""
    n = len(next(iter(rows.values())))
    pq.write_table(pa.table({"id": np.arange(n)} | rows), tmp / "rows.parquet")
    return tmp / "rows.parquet"


def ragged_feature_rows(base, tmp):
    table = pq.read_table(base["vec"]).to_pydict()
    table["x"][3] = table["x"][3][:5]  # a classifier's feature vector cannot be padded: the teacher would see zeros
    pq.write_table(pa.table(table), tmp / "ragged.parquet")
    return _cache_teacher(tmp, base["clf"], tmp / "ragged.parquet"), ["row 3", "holds 5 values", "'x' is ['batch', 8]"]


def null_inside_a_feature_row(base, tmp):
    table = pq.read_table(base["vec"]).to_pydict()
    table["x"][2][4] = None
    pq.write_table(pa.table(table), tmp / "null.parquet")
    return _cache_teacher(tmp, base["clf"], tmp / "null.parquet"), ["column 'x'", "1 null value(s) inside its rows"]


def classifier_logits_with_an_axis_of_one(base, tmp):
    teachers.make_classifier(tmp / "b1c.onnx", classes=CLASSES, logits_shape=["batch", 1, CLASSES])
    return _cache_teacher(tmp, tmp / "b1c.onnx", base["vec"]), ["came out [", ", 1, 10]", "[batch, classes]"]


def negative_token_id(base, tmp):
    data = _token_rows(tmp, {"input_ids": [[3, 4, 5], [1, -1]]})
    return _cache_teacher(tmp, base["tok"], data), ["negative token id -1;"]


def token_id_beyond_the_vocabulary(base, tmp):
    data = _token_rows(tmp, {"input_ids": [[3, 4, 5], [1, 60]]})  # the teacher's vocabulary is 50
    return _cache_teacher(tmp, base["tok"], data), ["largest token id in this batch is 60", "teacher's tokenizer"]


def fractional_token_ids(base, tmp):
    data = _token_rows(tmp, {"input_ids": [[3.0, 4.0], [1.5, 2.0]]})
    return _cache_teacher(tmp, base["tok"], data), ["column 'input_ids' holds 1.5,", "whole numbers"]


def attention_mask_of_another_length(base, tmp):
    data = _token_rows(tmp, {"input_ids": [[3, 4, 5], [1, 2]], "attention_mask": [[1, 1], [1, 1]]})
    return _cache_teacher(tmp, base["tok"], data), ["row 0 (id 0)", "attention_mask [1, 1]", "3 tokens"]


def left_padded_attention_mask(base, tmp):
    data = _token_rows(tmp, {"input_ids": [[3, 4, 5], [0, 0, 2]], "attention_mask": [[1, 1, 1], [0, 0, 1]]})
    return _cache_teacher(tmp, base["tok"], data), ["row 1 (id 1)", "1s then 0s", "unpadded"]


def infinite_temperature(base, tmp):
    return _cache_teacher(tmp, base["clf"], base["vec"], "--temperature", "inf"), ["temperature: inf", "[0.001, 1000]"]


def default_top_k_on_a_small_dynamic_vocabulary(base, tmp):
    teachers.make_classifier(tmp / "dyn.onnx", classes=5, logits_shape=["batch", "classes"])
    words = ["vocabulary of 5", "leaves that axis dynamic", "--top-k <= 5"]
    return _cache_teacher(tmp, tmp / "dyn.onnx", base["vec"]), words


def _student_file(tmp: Path) -> Path:
    """Students of a user's own module: one whose builder raises, one that predicts NaN."""
    (tmp / "students.py").write_text(
        "import torch\n"
        "def raises(num_outputs, input_dim):\n"
        "    raise RuntimeError('boom in my builder')\n"
        "class NaNs(torch.nn.Module):\n"
        "    def __init__(self, input_dim, num_outputs):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(input_dim, num_outputs)\n"
        "    def forward(self, batch):\n"
        "        out = self.linear(batch['x'])\n"
        "        return out * float('nan') if self.training else out\n"
        "def nans(num_outputs, input_dim):\n"
        "    return NaNs(input_dim, num_outputs)\n"
    )
    return tmp / "students.py"


def absolute_path_of_a_missing_cache(base, tmp):
    missing = tmp / "no" / "such" / "cache"
    args = ["--cache", missing, "--cache-dir", base["caches"]]
    return _train(tmp, base["vec"], *args), [f"no cache matches '{missing}'"]


def glob_characters_as_a_cache_key(base, tmp):
    return ["caches", "show", "**", "--cache-dir", base["caches"]], ["no cache matches '**'"]


def empty_sql(base, tmp):
    return ["query", "  ", "--cache-dir", base["caches"], "--runs-dir", tmp / "runs"], ["the SQL is empty"]


def infinite_ensemble_weight(base, tmp):
    caches = ["--cache", base["vec_cache"], "--cache", base["vec_cache"], "--method", "ensemble"]
    return _train(tmp, base["vec"], *caches, "--weights", "inf,1"), ["weights: [inf, 1.0]", "finite"]


def negative_weight_decay(base, tmp):
    return _train(tmp, base["vec"], "--alpha", "0", "--weight-decay", "-1"), ["weight_decay: -1.0"]


def student_builder_that_raises(base, tmp):
    student = f"{_student_file(tmp)}:raises"
    return _train(tmp, base["vec"], "--alpha", "0", "--student", student), ["raised RuntimeError: boom in my builder"]


def student_whose_loss_is_nan(base, tmp):
    student = f"{_student_file(tmp)}:nans"
    args = ["--cache", base["vec_cache"], "--student", student]
    return _train(tmp, base["vec"], *args), ["loss became", "nan", "step 1"]


def eval_cache_of_a_teacher_with_other_classes(base, tmp):
    teachers.make_classifier(tmp / "five.onnx", classes=5)
    five = _ok("cache-teacher", "--teacher", tmp / "five.onnx", "--data", base["vec"], *_at({"caches": tmp / "c5"}))
    args = ["--cache", base["vec_cache"], "--eval-data", base["vec"], "--eval-cache", five]
    return _train(tmp, base["vec"], *args), ["teacher with 5 classes", "the student predicts 10"]


def weights_without_an_ensemble(base, tmp):
    return _train(tmp, base["vec"], "--cache", base["vec_cache"], "--weights", "2"), ["weights: given with --method kd"]


def layer_map_without_progressive(base, tmp):
    args = ["--cache", base["vec_cache"], "--layer-map", "0=hidden"]
    return _train(tmp, base["vec"], *args), ["layer_map: given with --method kd"]


def ensemble_of_caches_at_other_temperatures(base, tmp):
    hot = _ok("cache-teacher", "--teacher", base["clf"], "--data", base["vec"], "--temperature", "2", *_at(base))
    args = ["--cache", base["vec_cache"], "--cache", hot, "--method", "ensemble"]
    return _train(tmp, base["vec"], *args), ["different temperatures [1.0, 2.0]", "give --temperature"]


def resume_of_a_directory_that_is_not_a_run(base, tmp):
    (tmp / "run").mkdir()
    return ["train-student", "--resume", "--out", tmp / "run"], ["holds no run to resume"]


def logits_too_large_for_float32(base, tmp):
    """Logits near float32's maximum: finite, but 1e38 apart they sum to probability 2 (no teacher gives them)."""
    scale = onnx.numpy_helper.from_array(np.array([3e38, 3e38, 2e38], np.float32), "scale")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
            onnx.helper.make_node("Mul", ["s", "zero"], ["z"]),
            onnx.helper.make_node("Add", ["z", "scale"], ["logits"]),
        ],
        "huge",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 3])],
        [
            scale,
            onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"),
            onnx.numpy_helper.from_array(np.array(0, np.float32), "zero"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", teachers.OPSET)])
    model.ir_version = teachers.IR_VERSION
    onnx.save(model, tmp / "huge.onnx")
    return _cache_teacher(tmp, tmp / "huge.onnx", base["vec"]), ["logits / T beyond 1e+30", "id 0"]


CASES: list[Callable] = [
    logits_too_large_for_float32,
    absolute_path_of_a_missing_cache,
    glob_characters_as_a_cache_key,
    empty_sql,
    infinite_ensemble_weight,
    negative_weight_decay,
    student_builder_that_raises,
    student_whose_loss_is_nan,
    eval_cache_of_a_teacher_with_other_classes,
    resume_of_a_directory_that_is_not_a_run,
    weights_without_an_ensemble,
    layer_map_without_progressive,
    ensemble_of_caches_at_other_temperatures,
    ragged_feature_rows,
    null_inside_a_feature_row,
    classifier_logits_with_an_axis_of_one,
    negative_token_id,
    token_id_beyond_the_vocabulary,
    fractional_token_ids,
    attention_mask_of_another_length,
    left_padded_attention_mask,
    infinite_temperature,
    default_top_k_on_a_small_dynamic_vocabulary,
    not_onnx,
    missing_external_data,
    missing_dataset,
    dataset_without_the_teachers_input,
    empty_dataset,
    both_label_columns,
    top_k_above_classes,
    cache_teacher_on_missing_cuda,
    edited_manifest_verify,
    edited_manifest_train,
    truncated_shard_train,
    truncated_shard_verify,
    cache_of_another_dataset,
    unknown_cache_key,
    label_outside_the_teachers_classes,
    student_family_that_does_not_fit,
    unknown_student_input,
    empty_dataset_train,
    train_on_missing_cuda,
    unknown_config_key,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_is_one_named_error(case, base, tmp_path) -> None:
    args, words = case(base, tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert "internal error" not in result.output, result.output
    # One message (a config lists every problem; verify reports each cache first).
    assert [line for line in result.output.splitlines() if line.startswith("Error: ")], result.output
    for word in words:
        assert word in result.output, (word, result.output)
    # A refused train-student leaves no run: the same --out takes the corrected command.
    assert not (tmp_path / "run" / "config.json").exists()
    assert not list((tmp_path / "c").glob("*/" + fmt.MANIFEST)), "a refused cache-teacher leaves no manifest"


def test_disk_full_while_caching_names_what_was_kept(base, tmp_path, monkeypatch) -> None:
    table = pq.read_table(base["vec"])
    pq.write_table(table, tmp_path / "vec.parquet", row_group_size=10)
    real = fmt.write_shard
    calls = []

    def full_after_one(table: pa.Table, path: Path, options: dict | None = None) -> dict:
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, path, options)

    monkeypatch.setattr(fmt, "write_shard", full_after_one)
    args = [
        "cache-teacher",
        "--teacher",
        base["clf"],
        "--data",
        tmp_path / "vec.parquet",
        "--cache-dir",
        tmp_path / "c",
    ]
    result = _invoke(*args, "--shard-size", "20", "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "disk full" in result.output and "1 complete shard(s) kept" in result.output
    assert not list((tmp_path / "c").glob("*/" + fmt.MANIFEST))
    monkeypatch.setattr(fmt, "write_shard", real)
    resumed = _invoke(*args, "--shard-size", "20", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (Path(resumed.stdout.strip().splitlines()[-1]) / fmt.MANIFEST).is_file()


def test_overwrite_replaces_runs_only(base, tmp_path) -> None:
    """--overwrite never deletes what is not a run: a cache root, or a folder holding the training data."""
    shutil.copytree(base["caches"], tmp_path / "caches")
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(base["vec"], folder / "vec.parquet")
    for out, data in ((tmp_path / "caches", base["vec"]), (folder, folder / "vec.parquet")):
        before = sorted(p.name for p in out.iterdir())
        args = ["train-student", "--data", data, "--alpha", "0", "--epochs", "1", "--out", out, "--overwrite"]
        result = _invoke(*args)
        assert result.exit_code == 1 and "not a run (no config.json)" in result.output, result.output
        assert sorted(p.name for p in out.iterdir()) == before
    run = tmp_path / "run"
    assert _invoke(*_train(tmp_path, base["vec"], "--alpha", "0")).exit_code == 0
    again = _invoke(*_train(tmp_path, base["vec"], "--alpha", "0", "--overwrite"))
    assert again.exit_code == 0 and (run / "metrics.json").is_file(), again.output
