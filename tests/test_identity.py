"""What a cache key is made of: every byte of the teacher (graph and external data), the dataset's rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.catalog import Catalog
from pipeline.cli import main
from pipeline.report import reliability
from stages import cache_format as fmt
from stages import cache_teacher, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.dataset import Dataset
from stages.errors import CacheError, DatasetError, TeacherError
from stages.teacher import ExternalFile, inspect, teacher_identity
from stages.trainer import Trainer
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


@pytest.mark.parametrize("postprocess", ["host", "graph"])
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
    assert info.sha256 == teacher_identity(hashlib.sha256(data).hexdigest(), info.external_data)
    assert info.sha256 != teacher_identity(hashlib.sha256(data).hexdigest(), [])
    shown = CliRunner().invoke(main, ["inspect-teacher", str(model)])
    assert shown.exit_code == 0 and "data      w 2.data  640 bytes" in shown.output, shown.output

    # Swapping the two files' contents keeps the same set of bytes but is another teacher.
    a, b = info.external_data
    swapped = [ExternalFile(a.location, b.bytes, b.sha256), ExternalFile(b.location, a.bytes, a.sha256)]
    assert teacher_identity(hashlib.sha256(data).hexdigest(), swapped) != info.sha256

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


# -- dataset: the rows, not the files ------------------------------------------------------------------------


def _rows(n: int = 60) -> pa.Table:
    """Every kind of column the contract allows, with nulls at every level."""
    rng = np.random.default_rng(3)
    return pa.table(
        {
            "id": pa.array([f"row-{i}" for i in range(n)]),
            "x": pa.array(
                [rng.normal(size=int(rng.integers(0, 4))).tolist() for _ in range(n)], pa.list_(pa.float32())
            ),
            "grid": pa.array([[[i, None], []] if i % 3 else None for i in range(n)], pa.list_(pa.list_(pa.int64()))),
            "meta": pa.array([{"n": i, "text": None if i % 5 == 0 else "é" * (i % 4)} for i in range(n)]),
            "label": pa.array([None if i % 7 == 0 else i % 10 for i in range(n)], pa.int64()),
        }
    )


def _fingerprint(path: Path) -> str:
    return Dataset(path).fingerprint()


def test_fingerprint_is_the_rows_not_the_files(tmp_path) -> None:
    rows = _rows()
    pq.write_table(rows, tmp_path / "a.parquet", row_group_size=16)
    reference = _fingerprint(tmp_path / "a.parquet")

    # The same rows, stored differently: another name and folder, codec, encoding, row groups, files, column order.
    (tmp_path / "copy").mkdir()
    shutil.copyfile(tmp_path / "a.parquet", tmp_path / "copy" / "renamed.parquet")
    pq.write_table(rows, tmp_path / "b.parquet", compression="gzip", use_dictionary=False, row_group_size=7)
    (tmp_path / "split").mkdir()
    pq.write_table(rows.slice(0, 23), tmp_path / "split" / "part-0.parquet")
    pq.write_table(rows.slice(23), tmp_path / "split" / "part-1.parquet", row_group_size=5)
    reordered = rows.select(["label", "meta", "id", "grid", "x"]).replace_schema_metadata(
        {"written by": "another tool"}
    )
    pq.write_table(reordered, tmp_path / "c.parquet")
    for same in ("copy/renamed.parquet", "b.parquet", "split", "c.parquet"):
        assert _fingerprint(tmp_path / same) == reference, same

    # Different rows: one value changed, a null where a value was, two rows swapped, one row fewer, a column renamed.
    label = rows.column("label").to_pylist()
    changed = rows.set_column(4, "label", pa.array([label[0], 99] + label[2:], pa.int64()))
    nulled = rows.set_column(4, "label", pa.array([label[0], None] + label[2:], pa.int64()))
    swapped = rows.take([1, 0] + list(range(2, len(rows))))
    renamed = rows.rename_columns(["id", "x", "grid", "meta", "labels"])
    for name, table in {"changed": changed, "nulled": nulled, "swapped": swapped, "renamed": renamed}.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    fingerprints = {name: _fingerprint(tmp_path / f"{name}.parquet") for name in ("changed", "nulled", "swapped")}
    fingerprints["shorter"] = _fingerprint(tmp_path / "split" / "part-1.parquet")
    fingerprints["renamed"] = _fingerprint(tmp_path / "renamed.parquet")
    assert len(set(fingerprints.values()) | {reference}) == len(fingerprints) + 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(
        st.one_of(st.none(), st.lists(st.one_of(st.none(), st.text(max_size=3)), max_size=3)), min_size=1, max_size=40
    ),
    cuts=st.lists(st.integers(0, 40), max_size=3),
    row_group_size=st.integers(1, 9),
)
def test_fingerprint_ignores_how_rows_are_cut_into_files(tmp_path_factory, values, cuts, row_group_size) -> None:
    table = pa.table(
        {"id": pa.array(range(len(values)), pa.int64()), "tokens": pa.array(values, pa.list_(pa.string()))}
    )
    whole, parts = tmp_path_factory.mktemp("whole") / "all.parquet", tmp_path_factory.mktemp("parts")
    pq.write_table(table, whole)
    bounds = [0] + sorted(min(c, len(values)) for c in cuts) + [len(values)]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        pq.write_table(table.slice(lo, hi - lo), parts / f"{i:02d}.parquet", row_group_size=row_group_size)
    assert _fingerprint(parts) == _fingerprint(whole)


def test_renamed_copy_of_a_dataset_is_a_cache_hit_and_trains(classifier_setup, tmp_path, monkeypatch) -> None:
    first = _cache(classifier_setup["teacher"], classifier_setup["data"], classifier_setup["cache_dir"])
    copy = tmp_path / "elsewhere" / "same rows.parquet"
    copy.parent.mkdir()
    shutil.copyfile(classifier_setup["data"], copy)
    monkeypatch.setattr(cache_teacher, "Teacher", None)  # a hit must not build a session
    second = _cache(classifier_setup["teacher"], copy, classifier_setup["cache_dir"])
    assert second.hit and second.path == first.path
    assert second.manifest["dataset"]["fingerprint_of"] == "rows"
    config = TrainStudentConfig(
        data=str(copy), cache=[str(first.path)], out=str(tmp_path / "run"), student="mlp:hidden=8", epochs=1,
        export_onnx=False,
    )  # fmt: skip
    assert train_student.run(config, progress=False, log=lambda m: None)["epochs"] == 1


def _as_legacy_cache(path: Path, data: Path) -> Path:
    """Rewrite a fresh cache as one written before row fingerprints: the files' fingerprint in its request and
    manifest, no marker, no manifest checksum, and the key (its folder's name) hashing that request."""
    manifest = json.loads((path / fmt.MANIFEST).read_text())
    del manifest["dataset"]["fingerprint_of"], manifest[fmt.MANIFEST_CHECKSUM]
    manifest["dataset"]["fingerprint"] = manifest["request"]["dataset_fingerprint"] = Dataset(data).file_fingerprint()
    manifest["key"] = fmt.cache_key(manifest["request"])
    (path / fmt.MANIFEST).write_text(json.dumps(manifest))
    return path.rename(path.parent / manifest["key"])


def test_cache_from_before_row_fingerprints_still_pairs_with_its_dataset(classifier_setup, tmp_path) -> None:
    # Manifests written before this change carry the fingerprint of the files' names and bytes, and no marker.
    result = _cache(classifier_setup["teacher"], classifier_setup["data"], classifier_setup["cache_dir"])
    path = _as_legacy_cache(result.path, classifier_setup["data"])
    config = TrainStudentConfig(
        data=str(classifier_setup["data"]), cache=[str(path)], out=str(tmp_path / "run"),
        student="mlp:hidden=8", epochs=1, export_onnx=False,
    )  # fmt: skip
    assert train_student.run(config, progress=False, log=lambda m: None)["epochs"] == 1
    other = tmp_path / "other.parquet"
    teachers.write_vectors(other, classifier_setup["x"][::-1].copy(), np.arange(300) % 10)
    with pytest.raises(CacheError, match="built from another dataset"):
        train_student.run(dataclasses.replace(config, data=str(other), overwrite=True), progress=False)


def test_a_cache_from_before_row_fingerprints_is_still_a_hit(classifier_setup, tmp_path, monkeypatch) -> None:
    s = classifier_setup
    old = _as_legacy_cache(_cache(s["teacher"], s["data"], s["cache_dir"]).path, s["data"])
    other_t = _cache(s["teacher"], s["data"], s["cache_dir"], temperature=2.0).path  # a row-fingerprint cache too
    monkeypatch.setattr(cache_teacher, "Teacher", None)  # a hit must not build a session
    logged = []
    again = cache_teacher.run(
        CacheTeacherConfig(teacher=str(s["teacher"]), data=str(s["data"]), cache_dir=str(s["cache_dir"]), top_k=4),
        progress=False,
        log=logged.append,
    )
    assert again.hit and again.path == old and "before datasets were fingerprinted by their rows" in logged[-1]
    assert _cache(s["teacher"], s["data"], s["cache_dir"], temperature=2.0).path == other_t
    # The same file name with other rows is not that cache: the request runs the teacher.
    changed = tmp_path / "changed" / s["data"].name
    changed.parent.mkdir()
    teachers.write_vectors(changed, s["x"][::-1].copy(), np.arange(300) % 10)
    with pytest.raises(TypeError):  # Teacher is None: the run got as far as loading the teacher
        _cache(s["teacher"], changed, s["cache_dir"])


def test_unreadable_manifests_beside_a_request_do_not_stop_it(classifier_setup) -> None:
    """The search for caches from before row fingerprints reads every manifest in the cache folder; what it cannot
    read as one (edited, truncated, another tool's) it passes over."""
    root = classifier_setup["cache_dir"]
    for name, text in (("a", "[1, 2]"), ("b", '{"request": [1], "dataset": {}}'), ("c", "{"), ("d", '{"dataset": []}')):
        (root / name).mkdir(parents=True)
        (root / name / fmt.MANIFEST).write_text(text)
    result = _cache(classifier_setup["teacher"], classifier_setup["data"], root)
    assert not result.hit and (result.path / fmt.MANIFEST).is_file()


# -- labels: "label" or the Hugging Face "labels", read through one name -------------------------------------


def _relabelled(table_path: Path, out: Path, rename: dict[str, str]) -> Path:
    table = pq.read_table(table_path)
    pq.write_table(table.rename_columns([rename.get(c, c) for c in table.column_names]), out)
    return out


def test_labels_column_trains_exactly_like_label(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    hf = _relabelled(s["data"], tmp_path / "hf.parquet", {"label": "labels"})
    metrics, reliabilities = [], []
    for name, data in (("label", s["data"]), ("labels", hf)):
        cache = _cache(s["teacher"], data, s["cache_dir"]).path
        config = TrainStudentConfig(
            data=str(data), cache=[str(cache)], alpha=0.5, out=str(tmp_path / name), student="mlp:hidden=8",
            epochs=2, export_onnx=False, eval_data=str(data), eval_cache=str(cache),
        )  # fmt: skip
        metrics.append(train_student.run(config, progress=False, log=lambda m: None))
        catalog = Catalog(s["cache_dir"], tmp_path / "no-runs")
        reliabilities.append(reliability(catalog, catalog.cache(cache.name)))
    # Before, "labels" was ignored: the loss had no hard labels and the accuracy had nothing to score.
    assert metrics[1]["test_accuracy"] == metrics[0]["test_accuracy"]
    assert metrics[1]["train_ce"] == metrics[0]["train_ce"] > 0
    assert reliabilities[1] == reliabilities[0] and sum(row["n"] for row in reliabilities[0][0]) == 300


def test_labels_column_makes_a_sequence_dataset_a_classification_task(tmp_path) -> None:
    # Without a cache, input_ids and no recognised label meant a language model: a vocabulary-sized head.
    seqs = teachers.random_sequences(40, 50)
    table = pa.table(
        {
            "id": pa.array(range(40)),
            "input_ids": pa.array([q.tolist() for q in seqs], pa.list_(pa.int64())),
            "labels": pa.array([len(q) % 3 for q in seqs], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "seq.parquet")
    config = TrainStudentConfig(
        data=str(tmp_path / "seq.parquet"), alpha=0.0, out=str(tmp_path / "run"), student="transformer", epochs=1,
        export_onnx=False, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    trainer = Trainer(config, progress=False, log=lambda m: None)
    trainer.setup()
    assert not trainer.token_level and trainer.inputs.num_outputs == 3


def test_label_columns_that_cannot_be_used_are_refused_up_front(classifier_setup, tmp_path) -> None:
    table = pq.read_table(classifier_setup["data"])
    both = tmp_path / "both.parquet"
    pq.write_table(table.append_column("labels", table.column("label")), both)
    with pytest.raises(DatasetError, match=r"both 'label' and 'labels' columns; keep one"):
        _cache(classifier_setup["teacher"], both, classifier_setup["cache_dir"])
    per_token = tmp_path / "per-token.parquet"
    pq.write_table(table.drop_columns("label").append_column("labels", table.column("x")), per_token)
    with pytest.raises(DatasetError, match=r"label column 'labels' .* holds list<.*must hold one integer class"):
        _cache(classifier_setup["teacher"], per_token, classifier_setup["cache_dir"])
