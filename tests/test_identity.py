"""What a cache key is made of: every byte of the teacher (graph and external data), the dataset's rows."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest

from stages import cache_format as fmt
from stages import cache_teacher
from stages.config import CacheTeacherConfig
from stages.errors import TeacherError
from stages.teacher import ExternalFile, inspect, teacher_identity
from tests import teachers


def _cache(teacher: Path, data: Path, cache_dir: Path, **overrides) -> cache_teacher.CacheResult:
    config = CacheTeacherConfig(teacher=str(teacher), data=str(data), cache_dir=str(cache_dir), top_k=4, **overrides)
    return cache_teacher.run(config, progress=False, log=lambda m: None)


def _targets(result: cache_teacher.CacheResult) -> tuple[np.ndarray, np.ndarray]:
    table = pa.concat_tables(fmt.open_cache(result.path).iter_tables())
    return np.asarray(table.column("topk_ids").to_pylist()), np.asarray(table.column("topk_logp").to_pylist())


def _expected(weights: dict, x: np.ndarray) -> np.ndarray:
    logits, _ = teachers.classifier_forward(weights, x)
    return np.argsort(-logits, axis=1, kind="stable")[:, :4]


@pytest.fixture
def external_setup(tmp_path: Path, classifier_setup: dict) -> dict:
    """The classifier teacher re-saved as a graph plus one weights file, in its own folder."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    model = teachers.save_with_external_data(
        classifier_setup["teacher"], folder / "model.onnx", {"w1": "model.onnx.data", "w2": "model.onnx.data"}
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return classifier_setup | {"teacher": model, "elsewhere": elsewhere}


@pytest.mark.parametrize("postprocess", ["torch", "graph"])
def test_external_data_teacher_runs_from_any_working_directory(external_setup, monkeypatch, postprocess) -> None:
    # Before the fix ORT resolved the weights against the cwd and refused the model (the graph path worked
    # only because it inlined the weights into a copy, which breaks past protobuf's 2 GB).
    monkeypatch.chdir(external_setup["elsewhere"])
    result = _cache(
        external_setup["teacher"], external_setup["data"], external_setup["cache_dir"], postprocess=postprocess
    )
    ids, _ = _targets(result)
    np.testing.assert_array_equal(ids, _expected(external_setup["weights"], external_setup["x"]))
    [recorded] = result.manifest["teacher"]["external_data"]
    data_file = external_setup["teacher"].parent / "model.onnx.data"
    assert recorded["location"] == "model.onnx.data" and recorded["bytes"] == data_file.stat().st_size


def test_changing_only_the_weights_file_is_a_new_cache(external_setup, tmp_path, monkeypatch) -> None:
    setup = external_setup
    first = _cache(setup["teacher"], setup["data"], setup["cache_dir"])
    # Another teacher with the same architecture: its graph file is byte-identical, only the weights differ.
    other = tmp_path / "other"
    other.mkdir()
    weights = teachers.make_classifier(other / "plain.onnx", seed=7)
    teachers.save_with_external_data(
        other / "plain.onnx", other / "model.onnx", {"w1": "model.onnx.data", "w2": "model.onnx.data"}
    )
    assert (other / "model.onnx").read_bytes() == setup["teacher"].read_bytes()
    shutil.copyfile(other / "model.onnx.data", setup["teacher"].parent / "model.onnx.data")

    second = _cache(setup["teacher"], setup["data"], setup["cache_dir"])
    assert not second.hit and second.path != first.path
    ids, _ = _targets(second)
    np.testing.assert_array_equal(ids, _expected(weights, setup["x"]))
    assert not np.array_equal(ids, _targets(first)[0])

    # The same bytes in another folder, run from another cwd, are the same teacher: a hit that runs nothing.
    moved = tmp_path / "moved"
    shutil.copytree(setup["teacher"].parent, moved)
    monkeypatch.chdir(setup["elsewhere"])
    monkeypatch.setattr(cache_teacher, "Teacher", None)  # a hit must not build a session
    third = _cache(moved / "model.onnx", setup["data"], setup["cache_dir"])
    assert third.hit and third.path == second.path


def test_identity_covers_every_external_file_and_its_name(classifier_setup, tmp_path) -> None:
    # Two files with awkward names, one in a subfolder; a tensor left inside the graph would count via the graph.
    locations = {"w1": "weights dir/ä 1.bin", "w2": "w 2.data"}
    model = teachers.save_with_external_data(classifier_setup["teacher"], tmp_path / "t" / "model.onnx", locations)
    info, _, data = inspect(model)
    assert [f.location for f in info.external_data] == sorted(locations.values())
    assert info.sha256 == teacher_identity(data, info.external_data)
    assert info.sha256 != teacher_identity(data, [])

    # Swapping the two files' contents keeps the same set of bytes but is another teacher.
    a, b = info.external_data
    swapped = [ExternalFile(a.location, b.bytes, b.sha256), ExternalFile(b.location, a.bytes, a.sha256)]
    assert teacher_identity(data, swapped) != info.sha256

    # A self-contained model keeps the identity it always had (its file's sha256), so old caches still hit.
    plain, _, plain_data = inspect(classifier_setup["teacher"])
    assert plain.sha256 == hashlib.sha256(plain_data).hexdigest() and plain.external_data == []


def test_missing_external_file_is_named(external_setup) -> None:
    (external_setup["teacher"].parent / "model.onnx.data").unlink()
    with pytest.raises(TeacherError, match=r"external-data file 'model.onnx.data' is missing"):
        _cache(external_setup["teacher"], external_setup["data"], external_setup["cache_dir"])


def test_external_location_outside_the_model_folder_is_refused(external_setup) -> None:
    # onnx will not write such a model; a hand-edited or foreign one can still point outside its folder.
    path = external_setup["teacher"]
    model = onnx.load(path, load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    path.write_bytes(model.SerializeToString())
    (path.parent / "model.onnx.data").rename(path.parent.parent / "model.onnx.data")
    with pytest.raises(TeacherError, match=r"'../model.onnx.data' is not a relative path inside"):
        inspect(path)
