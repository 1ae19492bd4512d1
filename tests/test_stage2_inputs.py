"""Stage two and reports on foreign inputs: teacher inputs not named `x`, sampled caches, padded vocabularies,
and every bad input refused at setup with a one-line message (no traceback, no metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file

from pipeline import cli_base
from pipeline.cli import main
from stages import train_student
from stages.students import build_student
from stages.train_outputs import NO_TEST_FIGURES
from tests import teachers

ROWS, CLASSES = 120, 6


def _vector_teacher(path: Path, widths: dict[str, int]) -> Path:
    """A linear classifier over float inputs named as given: logits = sum_i input_i @ w_i, [B, CLASSES]."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], []
    for name, width in widths.items():
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (width, CLASSES)).astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", [name, f"w_{name}"], [f"part_{name}"]))
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    nodes.append(helper.make_node("Sum", [f"part_{name}" for name in widths], ["logits"]))
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])
    graph = helper.make_graph(nodes, "vector_teacher", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def _vectors(path: Path, widths: dict[str, int], labels=None, rows: int = ROWS) -> Path:
    rng = np.random.default_rng(1)
    columns = {"id": pa.array(np.arange(rows))}
    for name, width in widths.items():
        columns[name] = pa.array(list(rng.normal(size=(rows, width)).astype(np.float32)), type=pa.list_(pa.float32()))
    columns["label"] = pa.array(np.arange(rows) % CLASSES if labels is None else labels, type=pa.int64())
    pq.write_table(pa.table(columns), path)
    return path


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cache(teacher: Path, data: Path, cache_dir: Path, *extra: str) -> str:
    result = _cli("cache-teacher", "--teacher", teacher, "--data", data, "--cache-dir", cache_dir, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def _train(data: Path, out: Path, cache_dir: Path, *extra: str):
    return _cli(
        "train-student", "--data", data, "--out", out, "--cache-dir", cache_dir, "--epochs", "1", "--quiet", *extra
    )


def _onnx_inputs(run: Path) -> list[tuple[str, list]]:
    session = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    return [(i.name, i.shape) for i in session.get_inputs()]


def _refused(result, out: Path, *words: str) -> None:
    """Exit 1 with a clean message naming the problem; nothing of a run left behind."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    for word in words:
        assert word in result.output, result.output
    assert not (out / "metrics.json").exists()


# ---- vector students read the teacher's input columns by name ------------------------------------------------


@pytest.mark.parametrize("name, family", [("pixels", "mlp:hidden=8"), ("features", "cnn1d:channels=4x4,kernel=3")])
def test_vector_students_read_and_export_the_teachers_input_name(name, family, tmp_path) -> None:
    teacher = _vector_teacher(tmp_path / "t.onnx", {name: 10})
    data = _vectors(tmp_path / "d.parquet", {name: 10})
    cache = _cache(teacher, data, tmp_path / "c", "--top-k", "3")
    out = tmp_path / "run"
    result = _train(data, out, tmp_path / "c", "--cache", cache, "--student", family)
    assert result.exit_code == 0, result.output
    assert _onnx_inputs(out) == [(name, ["batch", 10])]
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {name: np.ones((3, 10), np.float32)})[0].shape == (3, CLASSES)


def test_two_dimensional_float_input_caches_and_trains(tmp_path) -> None:
    """An image-like input [B, 3, 4] (nested lists per row): one dense array, not sequences to pad."""
    w = np.random.default_rng(0).normal(size=(12, CLASSES)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "image_teacher",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "t.onnx")
    x = np.random.default_rng(1).normal(size=(ROWS, 3, 4)).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array(np.arange(ROWS)),
            "pixels": pa.array([r.tolist() for r in x], type=pa.list_(pa.list_(pa.float32()))),
            "label": pa.array(np.arange(ROWS) % CLASSES, type=pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    cache = _cache(tmp_path / "t.onnx", tmp_path / "d.parquet", tmp_path / "c", "--top-k", str(CLASSES))
    shards = pq.read_table(sorted(Path(cache).glob("shard-*.parquet"))[0])
    z = x.reshape(ROWS, 12).astype(np.float64) @ w
    logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    cached = np.array(shards.column("topk_logp").to_pylist())
    ids = np.array(shards.column("topk_ids").to_pylist())
    np.testing.assert_allclose(cached, np.take_along_axis(logp[: len(ids)], ids, 1), atol=1e-4)

    out = tmp_path / "run"
    result = _train(tmp_path / "d.parquet", out, tmp_path / "c", "--cache", cache, "--student", "mlp:hidden=8")
    assert result.exit_code == 0, result.output
    assert _onnx_inputs(out) == [("pixels", ["batch", 3, 4])], "the student takes the teacher's input as it is"
    assert _first_layer_inputs(out) == 12


def _first_layer_inputs(run: Path) -> int:
    """in_features of an mlp student's first layer, from its checkpoint."""
    return load_file(run / "checkpoint.safetensors")["layers.0.0.weight"].shape[1]


def test_several_float_inputs_are_concatenated_or_selected(tmp_path) -> None:
    widths = {"a": 5, "b": 7}
    teacher = _vector_teacher(tmp_path / "t.onnx", widths)
    data = _vectors(tmp_path / "d.parquet", widths)
    cache = _cache(teacher, data, tmp_path / "c", "--top-k", "3")
    for run, extra, expected in [("both", [], [("a", 5), ("b", 7)]), ("ba", ["--inputs", "b,a"], [("b", 7), ("a", 5)])]:
        result = _train(data, tmp_path / run, tmp_path / "c", "--cache", cache, "--student", "mlp:hidden=8", *extra)
        assert result.exit_code == 0, result.output
        assert _onnx_inputs(tmp_path / run) == [(n, ["batch", w]) for n, w in expected]
        assert _first_layer_inputs(tmp_path / run) == 12
    selected = tmp_path / "b"
    result = _train(data, selected, tmp_path / "c", "--cache", cache, "--inputs", "b", "--no-onnx")
    assert result.exit_code == 0, result.output
    assert json.loads((selected / "config.json").read_text())["config"]["inputs"] == ["b"]
    assert _first_layer_inputs(selected) == 7

    out = tmp_path / "bad"
    _refused(
        _train(data, out, tmp_path / "c", "--cache", cache, "--inputs", "label"),
        out,
        "'label'",
        "float columns are ['a', 'b']",
    )
    # Without a teacher to say which columns, several float columns need --inputs ...
    _refused(_train(data, out, tmp_path / "c", "--alpha", "0"), out, "several float columns", "--inputs a,b")
    # ... and with it, a from-scratch student reads exactly those.
    assert (
        _train(data, tmp_path / "scratch", tmp_path / "c", "--alpha", "0", "--inputs", "a", "--no-onnx").exit_code == 0
    )
    assert _first_layer_inputs(tmp_path / "scratch") == 5


def test_vector_student_concatenates_its_inputs_in_the_order_named() -> None:
    model = build_student("mlp:hidden=1", num_outputs=2, input_dim={"b": 2, "a": 3})
    with torch.no_grad():
        first = model.layers[0][0]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 0] = 1.0  # the unit sees feature 0 of the concatenation alone: b's first
    a, b = torch.randn(4, 3), torch.randn(4, 2)
    assert torch.equal(model({"a": a, "b": b}).hidden[0][:, 0], torch.relu(b[:, 0]))


def test_custom_vector_builder_gets_the_column_names_and_their_shapes(tmp_path, monkeypatch) -> None:
    (tmp_path / "named_students.py").write_text(
        "import torch\n"
        "seen, shapes = [], []\n"
        "class Named(torch.nn.Module):\n"
        "    def __init__(self, names, dim, out):\n"
        "        super().__init__()\n        self.names, self.f = names, torch.nn.Linear(dim, out)\n"
        "    def forward(self, inputs):\n"
        "        shapes.append({n: tuple(inputs[n].shape) for n in self.names})\n"
        "        return self.f(torch.cat([inputs[n].flatten(1) for n in self.names], 1))\n"
        "def make(num_outputs, input_dim, input_names):\n"
        "    seen.append((input_names, input_dim))\n    return Named(input_names, input_dim, num_outputs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_student("named_students:make", num_outputs=3, input_dim={"pixels": (2, 3), "extra": 2})
    import named_students

    assert named_students.seen == [(["pixels", "extra"], 8)]
    assert named_students.shapes == [{"pixels": (2, 2, 3), "extra": (2, 2)}], "probed with the inputs' own shapes"
    assert model({"pixels": torch.zeros(5, 2, 3), "extra": torch.zeros(5, 2)}).logits.shape == (5, 3)


# ---- sampled caches: caches show and report -------------------------------------------------------------------


def test_report_and_caches_show_on_a_sampled_cache(tmp_path) -> None:
    teacher = _vector_teacher(tmp_path / "t.onnx", {"pixels": 10})
    data = _vectors(tmp_path / "d.parquet", {"pixels": 10})
    cache = _cache(teacher, data, tmp_path / "c", "--target-format", "sampled", "--samples", "16")
    runs = tmp_path / "runs"
    trained = _train(data, runs / "sampled", tmp_path / "c", "--cache", cache, "--no-onnx", "--eval-data", data)
    assert trained.exit_code == 0, trained.output
    roots = ["--cache-dir", tmp_path / "c", "--runs-dir", runs]

    shown = _cli("caches", "show", Path(cache).name, *roots)
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert "16 draws" in shown.output and "distinct ids drawn" in shown.output and "sampled v" in shown.output

    report = _cli("report", "sampled", "--out", tmp_path / "report", *roots)
    assert report.exit_code == 0 and "Traceback" not in report.output, report.output
    page = (tmp_path / "report" / "report.md").read_text()
    assert (
        "16 draws (sampled targets)" in page
        and "Reliability diagram skipped" in page
        and "16 draws per example" in page
    )
    assert "| distinct ids drawn |" in page and "| top draw's frequency |" in page
    assert not (tmp_path / "report" / "reliability.png").exists()
    assert not (tmp_path / "report" / "tail_mass.png").exists()


# ---- --truncate-vocab with a custom student whose vocabulary is padded -------------------------------------


PADDED = """
import torch


class Padded(torch.nn.Module):
    def __init__(self, vocab_size, width):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, width)
        self.num_layers = 1

    def forward(self, inputs):
        h = self.embed(inputs["input_ids"])
        return self.head(h), [h]


def make(num_outputs, vocab_size, multiple=64):
    return Padded(vocab_size, -(-num_outputs // multiple) * multiple)  # e.g. 49,152 -> 49,280 with 128
"""


def test_truncate_vocab_trains_a_padded_custom_student(token_setup, tmp_path) -> None:
    s = token_setup
    (tmp_path / "padded.py").write_text(PADDED)
    cache = _cache(s["teacher"], s["data"], s["cache_dir"], "--top-k", "5")
    args = ["--cache", cache, "--alpha", "1", "--student", f"{tmp_path / 'padded.py'}:make"]
    out = tmp_path / "refused"
    _refused(_train(s["data"], out, s["cache_dir"], *args), out, "(2, 4, 64)", "--truncate-vocab")

    out = tmp_path / "run"
    result = _train(
        s["data"], out, s["cache_dir"], *args, "--truncate-vocab", "--eval-data", s["data"], "--eval-cache", cache
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["test_kl"]) and np.isfinite(metrics["test_perplexity"])
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    ids = np.zeros((2, 3), np.int64)
    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (2, 3, 64), "the exported student keeps its padded head; training used its first 50"


# ---- bad inputs: refused at setup with the problem and the fix -----------------------------------------------


def test_empty_dataset_is_refused_by_both_stages(tmp_path) -> None:
    teacher = _vector_teacher(tmp_path / "t.onnx", {"pixels": 10})
    empty = _vectors(tmp_path / "empty.parquet", {"pixels": 10}, rows=0)
    result = _cli("cache-teacher", "--teacher", teacher, "--data", empty, "--cache-dir", tmp_path / "c")
    _refused(result, tmp_path / "c", "has no rows")
    assert not list((tmp_path / "c").glob("*/manifest.json"))
    out = tmp_path / "run"
    _refused(_train(empty, out, tmp_path / "c", "--alpha", "0"), out, "has no rows", str(empty))


def test_labels_outside_the_teachers_classes_are_refused_at_setup(tmp_path) -> None:
    teacher = _vector_teacher(tmp_path / "t.onnx", {"pixels": 10})
    labels = np.arange(ROWS) % CLASSES
    labels[7] = CLASSES + 3
    data = _vectors(tmp_path / "d.parquet", {"pixels": 10}, labels=labels)
    cache = _cache(teacher, data, tmp_path / "c", "--top-k", "3")
    out = tmp_path / "run"
    _refused(
        _train(data, out, tmp_path / "c", "--cache", cache),
        out,
        f"label {CLASSES + 3}",
        f"0..{CLASSES - 1}",
        f"at least {CLASSES + 4} classes",
    )
    assert not out.exists(), "refused before the run directory was made"

    negative = _vectors(tmp_path / "neg.parquet", {"pixels": 10}, labels=np.where(np.arange(ROWS) == 3, -1, 0))
    _refused(_train(negative, out, tmp_path / "c", "--alpha", "0"), out, "label -1", "null")
    text = (
        pq.read_table(negative).drop_columns(["label"]).append_column("label", pa.array([str(i) for i in range(ROWS)]))
    )
    pq.write_table(text, tmp_path / "text.parquet")
    _refused(_train(tmp_path / "text.parquet", out, tmp_path / "c", "--alpha", "0"), out, "holds string", "integer")

    good = _vectors(tmp_path / "good.parquet", {"pixels": 10})
    good_cache = _cache(teacher, good, tmp_path / "c", "--top-k", "3")
    _refused(
        _train(good, out, tmp_path / "c", "--cache", good_cache, "--eval-data", data),
        out,
        f"label {CLASSES + 3}",
        str(data),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when torch has no CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path) -> None:
    data = _vectors(tmp_path / "d.parquet", {"pixels": 10})
    out = tmp_path / "run"
    result = _train(data, out, tmp_path / "c", "--alpha", "0", "--device", "cuda")
    _refused(result, out, "--device cuda: torch has no CUDA here", "use --device cpu or auto")
    assert len(result.output.strip().splitlines()) == 1


def test_student_family_that_does_not_fit_the_data_names_the_one_that_does(token_setup, tmp_path) -> None:
    s = token_setup
    token_cache = _cache(s["teacher"], s["data"], s["cache_dir"], "--top-k", "5")
    out = tmp_path / "run"
    for family in ("mlp", "cnn1d", "transformer"):
        result = _train(s["data"], out, s["cache_dir"], "--cache", token_cache, "--alpha", "1", "--student", family)
        _refused(result, out, f"student '{family}' reads", "one target per token", "input_ids", "use causal-lm")

    teachers.make_sequence_classifier(tmp_path / "seq.onnx", classes=3)
    labelled = tmp_path / "labelled.parquet"
    table = pq.read_table(s["data"]).append_column("label", pa.array(np.arange(40) % 3, type=pa.int64()))
    pq.write_table(table, labelled)
    seq_cache = _cache(tmp_path / "seq.onnx", labelled, s["cache_dir"])
    for family in ("mlp", "causal-lm"):
        result = _train(labelled, out, s["cache_dir"], "--cache", seq_cache, "--student", family)
        _refused(result, out, "one target per sequence", "use transformer (sequence classifier)")

    vectors = _vectors(tmp_path / "v.parquet", {"pixels": 10})
    for family in ("transformer", "causal-lm"):
        result = _train(vectors, out, s["cache_dir"], "--alpha", "0", "--student", family)
        _refused(result, out, "float vectors", "column(s) pixels", "use mlp or cnn1d")


# ---- what train-student prints ------------------------------------------------------------------------------


def test_quiet_prints_only_the_summary_and_the_run_directory(tmp_path) -> None:
    data = _vectors(tmp_path / "d.parquet", {"pixels": 10})
    out = tmp_path / "run"
    result = _cli(
        "train-student", "--data", data, "--alpha", "0", "--epochs", "4", "--no-onnx", "--out", out, "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out)]
    assert result.stderr.splitlines() == [f"run saved to {out}: {NO_TEST_FIGURES}"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 4, "the epochs ran; they were not printed"

    loud = _cli(
        "train-student", "--data", data, "--alpha", "0", "--epochs", "4", "--no-onnx", "--out", tmp_path / "loud"
    )
    assert loud.stderr.count("  stage logits  ") == 4, "without --quiet: one line per epoch"


def test_ctrl_c_names_the_command_that_was_interrupted(tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_student, "run", interrupted)
    data = _vectors(tmp_path / "d.parquet", {"pixels": 10})
    result = _train(data, tmp_path / "run", tmp_path / "c", "--alpha", "0")
    assert result.exit_code == 130
    assert "train-student" in result.output and "--overwrite" in result.output
    assert "cache-teacher" not in result.output and "Traceback" not in result.output
    assert set(cli_base._AFTER_INTERRUPT) <= set(main.commands)
