"""Stage one end to end: round trips against the teacher recomputed directly, cache hits, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_format as fmt
from stages import cache_teacher, shard_runner
from stages.config import CacheTeacherConfig
from stages.errors import CacheError
from tests import teachers


def _run(setup: dict, **overrides) -> cache_teacher.CacheResult:
    config = CacheTeacherConfig(
        teacher=str(setup["teacher"]), data=str(setup["data"]), cache_dir=str(setup["cache_dir"]), **overrides
    )
    return cache_teacher.run(config, progress=False, log=lambda m: None)


def _read(path: Path) -> pa.Table:
    cache = fmt.open_cache(path)
    cache.verify()
    return pa.concat_tables(cache.iter_tables())


def _check_rows(table: pa.Table, logits: np.ndarray, k: int, t: float) -> None:
    ref = torch.log_softmax(torch.from_numpy(logits).double() / t, -1)
    ids = np.asarray(table.column("topk_ids").to_pylist())
    logp = np.asarray(table.column("topk_logp").to_pylist())
    # Equal logits (float16 teachers have many) go to the lower id, in the host kernel and ONNX's TopK alike.
    expected_ids = np.argsort(-ref.numpy(), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(logp, np.take_along_axis(ref.numpy(), ids, 1), atol=1e-5)
    np.testing.assert_allclose(
        table.column("logz").to_numpy(), torch.logsumexp(torch.from_numpy(logits).double() / t, -1), rtol=1e-5
    )
    np.testing.assert_allclose(table.column("tail_mass").to_numpy(), 1 - np.exp(logp).sum(1), atol=1e-5)


@pytest.mark.parametrize("postprocess", ["host", "graph"])
def test_classifier_round_trip(classifier_setup, postprocess) -> None:
    result = _run(
        classifier_setup,
        top_k=4,
        temperature=2.0,
        hidden=["hidden"],
        shard_size=128,
        batch_size=50,
        postprocess=postprocess,
    )
    table = _read(result.path)
    logits, hidden = teachers.classifier_forward(classifier_setup["weights"], classifier_setup["x"])
    assert table.column("id").to_pylist() == list(range(300))
    assert set(table.column("position").to_pylist()) == {0}
    _check_rows(table, logits, 4, 2.0)
    cached_hidden = np.asarray(table.column("hidden.hidden").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(cached_hidden, hidden, rtol=1e-3, atol=1e-3)  # float16 storage
    m = result.manifest
    assert m["teacher"]["kind"] == "classifier" and m["teacher"]["num_classes"] == 10
    assert m["hidden"] == {"hidden": [16]}
    assert m["num_positions"] == 300 and len(m["shards"]) == 3
    assert m["providers"] == ["CPUExecutionProvider"]
    assert m["postprocess"] == [postprocess]
    assert m["fidelity"]["kl_mean"] >= 0 and 0 < m["fidelity"]["tail_mass_mean"] < 1


@pytest.mark.parametrize("postprocess", ["host", "graph"])
def test_token_round_trip_with_padding(token_setup, postprocess) -> None:
    # Batches of 7 mixed lengths force padding; cached values must equal each sequence run alone, unpadded.
    result = _run(
        token_setup, top_k=5, temperature=1.5, hidden=["embed"], shard_size=16, batch_size=7, postprocess=postprocess
    )
    table = _read(result.path)
    seqs = token_setup["seqs"]
    assert table.num_rows == sum(len(s) for s in seqs)
    expected_ids = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)])
    expected_pos = np.concatenate([np.arange(len(s)) for s in seqs])
    np.testing.assert_array_equal(table.column("id").to_numpy(), expected_ids)
    np.testing.assert_array_equal(table.column("position").to_numpy(), expected_pos)
    outs = [teachers.token_forward(token_setup["weights"], s) for s in seqs]
    _check_rows(table, np.concatenate([o[0] for o in outs]), 5, 1.5)
    cached_embed = np.asarray(table.column("hidden.embed").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(cached_embed, np.concatenate([o[1] for o in outs]), rtol=1e-3, atol=1e-3)
    assert result.manifest["teacher"]["kind"] == "token"
    assert result.manifest["teacher"]["num_classes"] == 50


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_logits_of_another_float_type_are_read_as_they_are(token_setup, monkeypatch, dtype) -> None:
    """A teacher that returns float16 or float64 logits (under another output name): the cache holds the top-k of
    those values, whatever block the host kernel converts them in."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(token_setup["teacher"])
    elem = {np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}[dtype]
    model.graph.node.append(helper.make_node("Cast", ["logits"], ["scores out"], to=elem))
    old = model.graph.output[0]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    model.graph.output.remove(old)
    model.graph.output.append(helper.make_tensor_value_info("scores out", elem, dims))
    onnx.save(model, token_setup["teacher"])
    monkeypatch.setattr(shard_runner, "_DENSE_BLOCK_BYTES", 3 * 4 * 50)  # converted 3 rows at a time
    table = _read(_run(token_setup, top_k=6, temperature=0.8, batch_size=5).path)
    outs = [teachers.token_forward(token_setup["weights"], s)[0] for s in token_setup["seqs"]]
    logits = np.concatenate(outs).astype(dtype).astype(np.float64)
    _check_rows(table, logits, 6, 0.8)


def test_k_equal_vocabulary_has_zero_tail(classifier_setup) -> None:
    table = _read(_run(classifier_setup, top_k=10).path)
    assert (table.column("tail_mass").to_numpy() == 0).all()


def test_identical_request_is_a_cache_hit(classifier_setup, monkeypatch) -> None:
    first = _run(classifier_setup, top_k=3)
    assert not first.hit

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cache hit must not run the teacher")

    monkeypatch.setattr(cache_teacher, "Teacher", no_teacher)
    second = _run(classifier_setup, top_k=3, batch_size=17)  # batch size does not change the content
    assert second.hit and second.path == first.path
    other = classifier_setup | {"cache_dir": classifier_setup["cache_dir"]}
    with pytest.raises(AssertionError):
        _run(other, top_k=4)  # a different k is a different cache


def test_cli_prints_cache_path_last_and_reports_hit(classifier_setup) -> None:
    args = [
        "cache-teacher",
        "--teacher",
        str(classifier_setup["teacher"]),
        "--data",
        str(classifier_setup["data"]),
        "--top-k",
        "3",
        "--cache-dir",
        str(classifier_setup["cache_dir"]),
        "--quiet",
    ]
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    path = first.stdout.strip().splitlines()[-1]
    assert (Path(path) / fmt.MANIFEST).is_file()
    second = runner.invoke(main, args)
    assert second.stdout.strip().splitlines()[-1] == path
    assert "cache hit" in second.stderr


def test_a_teacher_handed_its_bytes_without_the_parsed_graph_still_changes_the_graph(classifier_setup) -> None:
    """cache-teacher lets the parsed graph go before the session is built when the session needs the bytes
    unchanged; a session that needs hidden outputs or the top-k head parses them again."""
    from stages.teacher import TOPK_IDS, Teacher, inspect

    info, _, data = inspect(classifier_setup["teacher"])
    x = classifier_setup["x"][:5]
    logits, hidden = teachers.classifier_forward(classifier_setup["weights"], x)
    with_hidden = Teacher(classifier_setup["teacher"], device="cpu", hidden=["hidden"], inspected=(info, None, data))
    out = with_hidden.run({"x": x})
    np.testing.assert_allclose(out[0], logits, rtol=1e-5)
    np.testing.assert_allclose(out[1], hidden, rtol=1e-5)
    info, _, data = inspect(classifier_setup["teacher"])
    head = Teacher(classifier_setup["teacher"], device="cpu", topk_in_graph=(3, 1.0), inspected=(info, None, data))
    assert head._outputs[0] == TOPK_IDS
    np.testing.assert_array_equal(head.run({"x": x})[0], np.argsort(-logits, axis=1, kind="stable")[:, :3])


def test_the_old_postprocess_name_torch_still_runs_on_the_host(classifier_setup) -> None:
    """Scripts written before the host kernel say --postprocess torch; it means host, the same cache and key."""
    old = _invoke(classifier_setup, "--top-k", "3", "--postprocess", "torch")
    assert old.exit_code == 0, old.output
    manifest = json.loads((Path(old.stdout.strip().splitlines()[-1]) / fmt.MANIFEST).read_text())
    assert manifest["postprocess"] == ["host"]
    new = _invoke(classifier_setup, "--top-k", "3", "--postprocess", "host")
    assert "cache hit" in new.stderr and new.stdout == old.stdout


def test_resume_after_kill_equals_uninterrupted_run(tmp_path) -> None:
    x = np.random.default_rng(3).normal(size=(3000, 8)).astype(np.float32)
    teachers.make_classifier(tmp_path / "clf.onnx")
    teachers.write_vectors(tmp_path / "big.parquet", x)
    base = [
        sys.executable,
        "-m",
        "pipeline",
        "cache-teacher",
        "--teacher",
        str(tmp_path / "clf.onnx"),
        "--data",
        str(tmp_path / "big.parquet"),
        "--top-k",
        "3",
        "--shard-size",
        "10",
        "--batch-size",
        "5",
        "--quiet",
    ]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        base + ["--cache-dir", str(tmp_path / "killed")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    journal = None
    deadline = time.time() + 60
    while time.time() < deadline:
        found = list((tmp_path / "killed").glob("*/" + fmt.JOURNAL))
        if found and len(found[0].read_text().splitlines()) >= 5:
            journal = found[0]
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert journal is not None, "the run never wrote a shard"
    cache_dir = journal.parent
    assert not (cache_dir / fmt.MANIFEST).exists(), "killed mid-run: the cache must not look complete"
    with pytest.raises(Exception, match="incomplete"):
        fmt.open_cache(cache_dir)
    kept = len(fmt.read_journal(cache_dir))
    assert 0 < kept < 300

    resumed = subprocess.run(base + ["--cache-dir", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept}" in resumed.stderr and "resuming" in resumed.stderr
    fresh = subprocess.run(base + ["--cache-dir", str(tmp_path / "fresh")], env=env, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    m_resumed = json.loads((Path(resumed.stdout.strip()) / fmt.MANIFEST).read_text())
    m_fresh = json.loads((Path(fresh.stdout.strip()) / fmt.MANIFEST).read_text())
    assert m_resumed["key"] == m_fresh["key"]
    assert [s["sha256"] for s in m_resumed["shards"]] == [s["sha256"] for s in m_fresh["shards"]]


# -- bad input: a clear message, a non-zero exit, and no manifest anywhere ----------------------------------


def _invoke(setup: dict, *extra: str, teacher=None, data=None, cache_dir=None):
    args = [
        "cache-teacher",
        "--teacher",
        str(teacher or setup["teacher"]),
        "--data",
        str(data or setup["data"]),
        "--cache-dir",
        str(cache_dir or setup["cache_dir"]),
        "--quiet",
        *extra,
    ]
    return CliRunner().invoke(main, args)


def _assert_fails(result, *words: str, cache_root: Path) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for word in words:
        assert word in result.output, result.output
    assert not list(Path(cache_root).rglob(fmt.MANIFEST)) if Path(cache_root).exists() else True


def test_bad_inputs(classifier_setup, tmp_path) -> None:
    s, root = classifier_setup, classifier_setup["cache_dir"]
    _assert_fails(_invoke(s, teacher=tmp_path / "nope.onnx"), "not found", cache_root=root)
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf \x00\xff" * 10)
    _assert_fails(_invoke(s, teacher=tmp_path / "junk.onnx"), "not an ONNX model", cache_root=root)
    _assert_fails(_invoke(s, data=tmp_path / "missing.parquet"), "dataset not found", cache_root=root)
    _assert_fails(_invoke(s, "--top-k", "11"), "larger than", "10", cache_root=root)
    _assert_fails(_invoke(s, "--temperature", "0"), "temperature", "must be in [0.001, 1000]", cache_root=root)
    _assert_fails(_invoke(s, "--temperature", "-2"), "temperature", cache_root=root)
    _assert_fails(
        _invoke(s, "--hidden", "no_such_tensor"), "no_such_tensor", "not in the teacher graph", cache_root=root
    )

    teachers.write_vectors(tmp_path / "dup.parquet", s["x"][:10], ids=np.array([0, 1, 2, 3, 3, 5, 6, 7, 8, 9]))
    _assert_fails(_invoke(s, data=tmp_path / "dup.parquet"), "duplicated", "3", cache_root=root)

    teachers.write_vectors(tmp_path / "wide.parquet", np.ones((10, 9), np.float32))
    _assert_fails(_invoke(s, data=tmp_path / "wide.parquet"), "shape [9]", cache_root=root)

    seq = teachers.write_sequences(tmp_path / "seq.parquet", teachers.random_sequences(5, 10))
    _assert_fails(_invoke(s, data=seq), "needs input(s) ['x']", cache_root=root)

    bad = s["x"][:20].copy()
    bad[7, 2] = np.nan
    teachers.write_vectors(tmp_path / "nan.parquet", bad)
    _assert_fails(_invoke(s, data=tmp_path / "nan.parquet"), "NaN or infinite", "id 7", cache_root=root)

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _assert_fails(
        _invoke(s, cache_dir=blocker / "sub"), "cannot write the cache directory", cache_root=blocker.parent / "nowhere"
    )


def test_config_file_with_unknown_key_reports_every_problem(classifier_setup, tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("top_k = -1\ntemprature = 2.0\nbatch_size = -1\n")
    result = _invoke(classifier_setup, "--config", str(cfg))
    _assert_fails(
        result, "unknown key 'temprature'", "top_k: -1", "batch_size: -1", cache_root=classifier_setup["cache_dir"]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the request would succeed")
def test_device_cuda_without_cuda_fails_clearly(classifier_setup) -> None:
    result = _invoke(classifier_setup, "--device", "cuda", "--top-k", "3")
    _assert_fails(result, "--device cuda", "--device cpu", cache_root=classifier_setup["cache_dir"])


def test_device_auto_reports_the_provider_that_ran(classifier_setup) -> None:
    result = _invoke(classifier_setup, "--top-k", "3")
    assert result.exit_code == 0
    manifest = json.loads((Path(result.stdout.strip().splitlines()[-1]) / fmt.MANIFEST).read_text())
    assert manifest["providers"][0] in result.stderr
    assert manifest["postprocess"] == ["graph" if manifest["providers"] == ["CUDAExecutionProvider"] else "host"]
    assert f"top-k in {manifest['postprocess'][0]}" in result.stderr


def test_auto_postprocess_is_decided_by_the_provider_that_loaded() -> None:
    choose = cache_teacher.choose_postprocess
    assert choose("auto", "topk", "CUDAExecutionProvider") == "graph"
    assert choose("auto", "topk", "CPUExecutionProvider") == "host"
    assert choose("graph", "topk", "CPUExecutionProvider") == "graph"  # asked for explicitly: kept
    assert choose("host", "topk", "CUDAExecutionProvider") == "host"
    assert choose("auto", "sampled", "CUDAExecutionProvider") == "host"  # sampling needs the full logits


def test_a_cache_being_written_is_refused_while_its_lock_is_held(classifier_setup) -> None:
    path = _run(classifier_setup, top_k=2).path
    (path / fmt.MANIFEST).unlink()  # incomplete again, as while a cache-teacher is writing it
    with fmt.try_lock(path) as held:
        assert held is not None
        with pytest.raises(CacheError, match="another cache-teacher process is writing"):
            _run(classifier_setup, top_k=2)
    assert not _run(classifier_setup, top_k=2).hit  # the lock released: it completes from the journal


def test_a_resume_keeps_the_first_shard_size_and_says_so(classifier_setup) -> None:
    first = _run(classifier_setup, top_k=2, shard_size=64)
    (first.path / fmt.MANIFEST).unlink()  # interrupted before its manifest: the next run resumes it
    said = []
    config = CacheTeacherConfig(
        teacher=str(classifier_setup["teacher"]),
        data=str(classifier_setup["data"]),
        cache_dir=str(classifier_setup["cache_dir"]),
        top_k=2,
        shard_size=32,
    )
    resumed = cache_teacher.run(config, progress=False, log=said.append)
    assert resumed.path == first.path and len(resumed.manifest["shards"]) == len(first.manifest["shards"])
    assert any("--shard-size 32 ignored: this cache was started with 64" in line for line in said), said


def test_sequence_classifier_over_unpadded_token_inputs(tmp_path) -> None:
    # A sentence classifier (e.g. MiniLM + head): ragged token inputs are padded per batch, one row per example.
    weights = teachers.make_sequence_classifier(tmp_path / "seqclf.onnx")
    seqs = teachers.random_sequences(30, 50, seed=4)
    data = teachers.write_sequences(tmp_path / "seqs.parquet", seqs)
    config = CacheTeacherConfig(
        teacher=str(tmp_path / "seqclf.onnx"), data=str(data), cache_dir=str(tmp_path / "c"), top_k=3, batch_size=8
    )
    result = cache_teacher.run(config, progress=False, log=lambda m: None)
    table = _read(result.path)
    assert table.column("id").to_pylist() == list(range(30)) and set(table.column("position").to_pylist()) == {0}
    _check_rows(table, np.stack([teachers.sequence_classifier_forward(weights, s) for s in seqs]), 3, 1.0)
    assert result.manifest["teacher"]["kind"] == "classifier"


def test_a_decoder_exported_with_its_cache_needs_only_input_ids(tmp_path) -> None:
    """A decoder exported as Hugging Face's tools export one (position_ids, a key/value cache, use_cache_branch)
    runs on a dataset of input_ids alone: positions 0.. per sequence, an empty cache, the branch off, so the
    cached targets are those of the plain forward pass (the teacher's logits shift if any of the three is wrong)."""
    weights = teachers.make_cached_decoder(tmp_path / "decoder.onnx")
    seqs = teachers.random_sequences(20, 50, max_len=30, seed=5)
    data = teachers.write_sequences(tmp_path / "seqs.parquet", seqs)
    config = CacheTeacherConfig(
        teacher=str(tmp_path / "decoder.onnx"), data=str(data), cache_dir=str(tmp_path / "c"), top_k=5, batch_size=6
    )
    table = _read(cache_teacher.run(config, progress=False, log=lambda m: None).path)
    _check_rows(table, np.concatenate([teachers.cached_decoder_forward(weights, s) for s in seqs]), 5, 1.0)
    shown = CliRunner().invoke(main, ["inspect-teacher", str(tmp_path / "decoder.onnx")])
    made = {line.split()[1] for line in shown.output.splitlines() if line.endswith("has no such column)")}
    assert shown.exit_code == 0 and made == {
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "use_cache_branch",
    }


def test_generated_inputs_for_a_batch() -> None:
    from stages.teacher import TeacherInput, generated_input

    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    made = {
        name: generated_input(TeacherInput(name, dtype, shape), mask)
        for name, dtype, shape in [
            ("position_ids", np.int64, ("batch", "seq")),
            ("past_key_values.3.value", np.float16, ("batch_size", 4, "past_sequence_length", 16)),
            ("past.0", np.float32, (2, "batch", 12, "past_seq", 64)),  # GPT-2's older export: key and value stacked
            ("use_cache_branch", np.bool_, (1,)),
            ("token_type_ids", np.int32, ("batch", "seq")),
        ]
    }
    np.testing.assert_array_equal(made["position_ids"], [[0, 1, 2, 0], [0, 1, 0, 0]])
    assert (
        made["past_key_values.3.value"].shape == (2, 4, 0, 16) and made["past_key_values.3.value"].dtype == np.float16
    )
    assert made["past.0"].shape == (2, 2, 12, 0, 64)
    assert made["use_cache_branch"].tolist() == [False]
    assert made["token_type_ids"].dtype == np.int32 and not made["token_type_ids"].any()


def test_a_teacher_without_an_attention_mask_never_sees_padding(tmp_path) -> None:
    """A pooling teacher with input_ids alone counts padding as tokens: the pipeline batches such a teacher's
    sequences by equal length, so each row's targets are those of the row run alone, at any batch size."""
    weights = teachers.make_unmasked_pooler(tmp_path / "pooler.onnx")
    seqs = teachers.random_sequences(30, 50, min_len=1, max_len=9, seed=3)
    data = teachers.write_sequences(tmp_path / "seqs.parquet", seqs)
    expected = np.stack([teachers.sequence_classifier_forward(weights, s) for s in seqs])
    for batch in (64, 1):
        config = CacheTeacherConfig(
            teacher=str(tmp_path / "pooler.onnx"),
            data=str(data),
            cache_dir=str(tmp_path / f"c{batch}"),
            top_k=4,
            batch_size=batch,
        )
        _check_rows(_read(cache_teacher.run(config, progress=False, log=lambda m: None).path), expected, 4, 1.0)


@pytest.mark.parametrize("batch", [1, 7])
def test_a_teacher_with_a_fixed_batch_axis(tmp_path, batch) -> None:
    """An export without a dynamic batch axis takes exactly that many rows: 30 rows in batches of 7 (the last
    filled up with copies, their outputs dropped), or one at a time, whatever --batch-size says."""
    weights = teachers.make_classifier(tmp_path / "fixed.onnx", batch=batch)
    x = np.random.default_rng(4).normal(size=(30, 8)).astype(np.float32)
    data = teachers.write_vectors(tmp_path / "x.parquet", x)
    config = CacheTeacherConfig(
        teacher=str(tmp_path / "fixed.onnx"), data=str(data), cache_dir=str(tmp_path / "c"), top_k=3, batch_size=64
    )
    table = _read(cache_teacher.run(config, progress=False, log=lambda m: None).path)
    assert table.num_rows == 30
    _check_rows(table, teachers.classifier_forward(weights, x)[0], 3, 1.0)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """`pipeline ... | head -1`: the reader leaves early; the command stops as SIGPIPE would stop it, no error."""
    teachers.make_classifier(tmp_path / "m.onnx")
    command = [sys.executable, "-m", "pipeline", "inspect-teacher", str(tmp_path / "m.onnx"), "--all"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed before the command writes a line: its first write fails
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and stderr == "", stderr
