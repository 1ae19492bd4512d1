"""The catalog commands on real small caches and runs built in tmp_path: list, show, verify, rm, gc, runs, query."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_teacher, train_student
from stages.cache_format import open_cache
from stages.config import CacheTeacherConfig, TrainStudentConfig
from tests import teachers


def _cache(teacher, data, root, **options) -> cache_teacher.CacheResult:
    config = CacheTeacherConfig(teacher=str(teacher), data=str(data), cache_dir=str(root), **options)
    return cache_teacher.run(config, progress=False, log=lambda m: None)


@pytest.fixture
def world(classifier_setup: dict, tmp_path: Path) -> dict:
    """Two teachers' caches of one dataset (k = V in 3 shards; k = 3 < V), a KD run and a from-scratch run."""
    s = classifier_setup
    root, runs = s["cache_dir"], tmp_path / "runs"
    full = _cache(s["teacher"], s["data"], root, top_k=10, temperature=2.0, shard_size=128)
    other = teachers.make_classifier(tmp_path / "clf2.onnx", seed=1)
    top3 = _cache(tmp_path / "clf2.onnx", s["data"], root, top_k=3)
    common = dict(
        data=str(s["data"]), epochs=1, export_onnx=False, cache_dir=str(root), eval_data=str(s["data"]), student="mlp"
    )
    train_student.run(
        TrainStudentConfig(
            cache=[full.path.name[:6]], alpha=0.5, eval_cache=full.path.name, out=str(runs / "exp" / "kd"), **common
        ),
        progress=False,
        log=lambda m: None,
    )
    train_student.run(
        TrainStudentConfig(alpha=0.0, out=str(runs / "exp" / "scratch"), **common), progress=False, log=lambda m: None
    )
    return {**s, "root": root, "runs": runs, "full": full, "top3": top3, "other_weights": other}


def cli(world: dict, *args: str, **kwargs):
    result = CliRunner().invoke(
        main, [*args, "--cache-dir", str(world["root"]), "--runs-dir", str(world["runs"])], **kwargs
    )
    return result


def test_caches_list_shows_each_cache_with_its_runs(world):
    (world["root"] / ("ab" * 8)).mkdir()  # a leftover with no manifest
    result = cli(world, "caches", "list", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.output)}
    full, top3 = rows[world["full"].path.name], rows[world["top3"].path.name]
    assert (full["k"], full["T"], full["positions"], full["status"], full["runs"]) == (10, 2.0, 300, "complete", 1)
    assert full["teacher"] == "clf.onnx " + world["full"].manifest["teacher"]["sha256"][:8]
    assert (top3["k"], top3["runs"], top3["kind"]) == (3, 0, "classifier")
    assert rows["ab" * 8]["status"] == "incomplete"
    table = cli(world, "caches", "list").output
    # header, rule, then one row per cache (ordered by creation minute, then key: any of the rows)
    assert any(world["full"].path.name in line for line in table.splitlines()[2:5])


def test_caches_list_says_what_each_position_holds(world):
    """k, encoding and top-p in the listing's words, and as columns of the catalog for SQL."""
    compact = _cache(world["teacher"], world["data"], world["root"], top_k=6, top_p=0.8, min_k=2, encoding="int8")
    rows = {r["key"]: r for r in json.loads(cli(world, "caches", "list", "--format", "json").output)}
    assert rows[compact.path.name]["targets"] == "top-6 top-p 0.8 (at least 2), int8 log-probs"
    assert rows[world["top3"].path.name]["targets"] == "top-3"
    sql = f"SELECT encoding, top_p, min_k FROM caches WHERE key = '{compact.path.name}'"
    assert json.loads(cli(world, "query", sql, "--format", "json").output) == [
        {"encoding": "int8", "top_p": 0.8, "min_k": 2}
    ]


def test_caches_list_says_why_a_cache_is_unreadable_or_short_of_shards(world):
    """The listing gives the first line of what `caches verify` says, without the cache's path it already names."""
    fine = cli(world, "caches", "list").output
    assert "problem" not in fine.splitlines()[0]  # no cache has one: no column
    manifest = world["full"].path / "manifest.json"
    edited = json.loads(manifest.read_text()) | {"top_k": 3}
    manifest.write_text(json.dumps(edited))
    (world["top3"].path / "shard-00000.parquet").unlink()
    rows = {r["key"]: r for r in json.loads(cli(world, "caches", "list", "--format", "json").output)}
    full, top3 = rows[world["full"].path.name], rows[world["top3"].path.name]
    assert full["status"] == "unreadable" and full["problem"].startswith("manifest.json was changed after")
    assert str(world["full"].path) not in full["problem"] and "\n" not in full["problem"]
    assert (top3["status"], top3["problem"]) == ("missing shards", "shard-00000.parquet")
    table = cli(world, "caches", "list").output.splitlines()
    assert table[0].split()[-1] == "problem"
    line = next(line for line in table if line.startswith(world["full"].path.name))
    assert "unreadable" in line and "manifest.json was changed after" in line
    verify = cli(world, "caches", "verify", world["full"].path.name).output
    assert full["problem"] in verify  # the same words as verify's, which goes on to the fix
    missing = cli(world, "caches", "verify", world["top3"].path.name).output
    assert f"shard-00000.parquet is missing. Remove the cache (pipeline caches rm {world['top3'].path.name})" in missing


def test_caches_show_statistics_agree_with_the_shards_and_the_probe(world):
    for result, k in ((world["full"], 10), (world["top3"], 3)):
        out = cli(world, "caches", "show", result.path.name[:5], "--json")
        assert out.exit_code == 0, out.output
        shown = json.loads(out.output)
        stats = shown["statistics"]
        table = pa.concat_tables(open_cache(result.path).iter_tables(["topk_logp", "tail_mass"]))
        logp = np.stack(table.column("topk_logp").to_numpy(zero_copy_only=False))
        tail = table.column("tail_mass").to_numpy()
        top1 = np.exp(logp[:, 0].astype(np.float64))
        assert stats["positions"] == 300
        assert stats["top1_prob"]["mean"] == pytest.approx(top1.mean(), rel=1e-6)
        assert stats["top1_prob"]["p50"] == pytest.approx(np.quantile(top1, 0.5), rel=1e-6)
        assert stats["tail_mass"]["max"] == pytest.approx(max(tail.max(), 0), abs=1e-7)
        weights, temperature = (world["weights"], 2.0) if k == 10 else (world["other_weights"], 1.0)
        z = teachers.classifier_forward(weights, world["x"])[0].astype(np.float64) / temperature
        logq = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        entropy = float(-(np.exp(logq) * logq).sum(1).mean())  # dense, over all 300 positions
        lower, upper = stats["entropy_lower"]["mean"], stats["entropy_upper"]["mean"]
        if k == 10:  # k = V: both bounds are the exact entropy
            assert lower == pytest.approx(entropy, abs=1e-4) and upper == pytest.approx(lower, abs=1e-9)
        else:
            assert lower - 1e-6 <= entropy <= upper + 1e-6 and lower < upper
        assert shown["fidelity"]["positions"] == (128 if k == 10 else 300)  # the probe: the first shard's positions
    text = cli(world, "caches", "show", world["top3"].path.name).output
    assert (
        "fidelity probe" in text
        and "KL(teacher || reconstructed from cache)" in text
        and "entropy >= (bound, nats)" in text
    )


def test_unknown_and_ambiguous_keys_are_clear_errors(world):
    for key in ("abcd000000000001", "abcd000000000002"):
        (world["root"] / key).mkdir()
    unknown = cli(world, "caches", "show", "fffffff")
    assert unknown.exit_code == 1 and "no cache matches 'fffffff'" in unknown.output
    ambiguous = cli(world, "caches", "verify", "abcd")
    assert ambiguous.exit_code == 1 and "ambiguous" in ambiguous.output and "abcd000000000001" in ambiguous.output
    incomplete = cli(world, "caches", "show", "abcd000000000001")
    assert incomplete.exit_code == 1 and "incomplete" in incomplete.output


def test_catalog_reflects_a_cache_corrupted_or_removed_on_disk(world):
    key = world["full"].path.name
    assert cli(world, "caches", "verify", key[:4]).exit_code == 0
    shard = world["full"].path / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (world["root"] / ("c" * 16)).mkdir()  # an interrupted leftover: skipped, not failed
    bad = cli(world, "caches", "verify")
    assert "skip  " + "c" * 16 in bad.output
    assert bad.exit_code == 1 and "shard-00001.parquet" in bad.output and "sha256" in bad.output
    assert f"ok    {world['top3'].path.name}" in bad.output  # the other cache still verifies
    shutil.rmtree(world["full"].path)
    listed = cli(world, "caches", "list").output
    assert key not in listed and world["top3"].path.name in listed
    runs = json.loads(
        cli(world, "query", "SELECT run, cache_keys FROM runs WHERE run = 'exp/kd'", "--format", "json").output
    )
    assert runs == [{"run": "exp/kd", "cache_keys": [key]}]  # the run still records it, the catalog no longer has it
    assert cli(world, "caches", "show", key).exit_code == 1


def test_rm_removes_one_cache_only_when_confirmed(world):
    key = world["top3"].path.name
    declined = cli(world, "caches", "rm", key, input="n\n")
    assert declined.exit_code == 1 and world["top3"].path.is_dir()
    done = cli(world, "caches", "rm", key, "--yes")
    assert done.exit_code == 0 and "removed cache " + key in done.output
    assert not world["top3"].path.exists() and world["full"].path.is_dir()


def test_gc_removes_leftovers_but_not_complete_or_locked_caches(world):
    stale, busy, foreign = world["root"] / ("1" * 16), world["root"] / ("2" * 16), world["root"] / ("3" * 16)
    for d in (stale, busy):
        d.mkdir()
        (d / "request.json").write_text("{}")  # cache-teacher's first file
        (d / "shard-00000.parquet").write_bytes(b"partial")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("named like a key, but not a cache")
    with open(busy / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live cache-teacher holds it
        dry = cli(world, "caches", "gc", "--dry-run")
        assert dry.exit_code == 0 and "would remove" in dry.output and stale.is_dir()
        assert not (stale / ".lock").exists()  # a dry run leaves the directory as it was
        done = cli(world, "caches", "gc")
    assert done.exit_code == 0, done.output
    assert not stale.exists() and busy.is_dir() and "holds its lock" in done.output
    assert (foreign / "notes.txt").is_file() and "cache-teacher did not write it" in done.output
    assert world["full"].path.is_dir() and world["top3"].path.is_dir()
    released = cli(world, "caches", "gc")  # the writer is gone: its leftover goes too
    assert "removed" in released.output and not busy.exists()
    shutil.rmtree(foreign)
    assert "nothing to collect" in cli(world, "caches", "gc").output


def test_runs_list_and_compare(world):
    listed = cli(world, "runs", "list", "--format", "csv")
    assert listed.exit_code == 0, listed.output
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(listed.output))}
    assert set(rows) == {"exp/kd", "exp/scratch"}
    kd_metrics = json.loads((world["runs"] / "exp" / "kd" / "metrics.json").read_text())
    assert float(rows["exp/kd"]["test_accuracy"]) == pytest.approx(kd_metrics["test_accuracy"], rel=1e-3)
    assert json.loads(rows["exp/kd"]["caches"]) == [world["full"].path.name]
    compared = cli(world, "runs", "compare", "kd", "exp/scratch")
    assert compared.exit_code == 0, compared.output
    lines = {line.split()[0]: line for line in compared.output.splitlines() if line.strip()}
    assert lines["config.alpha"].split()[1:] == ["0.5", "0"]
    assert world["full"].path.name in lines["caches"] and "none" in lines["caches"]
    assert "test_accuracy" in lines and "config.lr" not in lines  # identical fields hidden without --all
    assert "config.lr" in cli(world, "runs", "compare", "kd", "scratch", "--all").output


def test_run_without_metrics_and_unknown_run(world):
    unfinished = world["runs"] / "exp" / "unfinished"
    shutil.copytree(world["runs"] / "exp" / "kd", unfinished)
    (unfinished / "metrics.json").unlink()
    listed = {r["run"]: r for r in csv.DictReader(io.StringIO(cli(world, "runs", "list", "--format", "csv").output))}
    assert listed["exp/unfinished"]["status"] == "interrupted" and listed["exp/kd"]["status"] == "complete"
    assert listed["exp/unfinished"]["last_step"] == listed["exp/kd"]["last_step"] != ""
    compared = cli(world, "runs", "compare", "unfinished")
    assert compared.exit_code == 0 and "is interrupted at step" in compared.output
    report = cli(world, "report", "unfinished", "--out", str(world["runs"].parent / "rep"))
    assert report.exit_code == 1 and "has no metrics.json" in report.output and "--resume" in report.output
    unknown = cli(world, "runs", "compare", "nope")
    assert unknown.exit_code == 1 and "no run 'nope'" in unknown.output
    (unfinished / "config.json").write_text("{oops")  # damaged: left out of the views, and said so
    listed = cli(world, "runs", "list", "--format", "csv")
    assert listed.exit_code == 0 and "exp/unfinished" not in listed.stdout
    assert f"note: left out {unfinished}: {unfinished / 'config.json'} cannot be read" in listed.stderr


def test_query_joins_two_teachers_positions_and_reports_sql_errors(world):
    a, b = world["full"].path.name, world["top3"].path.name
    sql = f"""SELECT avg((x.topk_ids[1] = y.topk_ids[1])::DOUBLE) AS agreement, count(*) AS n
              FROM positions x JOIN positions y USING (id, position)
              WHERE x.cache_key = '{a}' AND y.cache_key = '{b}'"""
    result = cli(world, "query", sql, "--format", "json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    top1_a = np.argmax(teachers.classifier_forward(world["weights"], world["x"])[0], -1)
    top1_b = np.argmax(teachers.classifier_forward(world["other_weights"], world["x"])[0], -1)
    assert row == {"agreement": pytest.approx(float((top1_a == top1_b).mean())), "n": 300}
    table = cli(world, "query", "SELECT key, runs FROM caches ORDER BY key")
    assert table.exit_code == 0 and table.output.splitlines()[0].split() == ["key", "runs"]
    bad = cli(world, "query", "SELECT nope FROM caches")
    assert bad.exit_code == 1 and "Binder Error" in bad.output and "nope" in bad.output
    missing = cli(world, "query", "SELECT * FROM no_such_view")
    assert missing.exit_code == 1 and "no_such_view" in missing.output


def test_empty_roots_say_so(tmp_path):
    runner = CliRunner()
    args = ["--cache-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path / "none")]
    listed = runner.invoke(main, ["caches", "list", *args])
    assert listed.exit_code == 0 and "no caches under" in listed.output
    assert "no runs under" in runner.invoke(main, ["runs", "list", *args]).output
    counted = runner.invoke(main, ["query", "SELECT count(*) AS n FROM positions", *args, "--format", "json"])
    assert counted.exit_code == 0 and json.loads(counted.output) == [{"n": 0}]


def test_sampled_cache_in_list_show_and_positions(token_setup, tmp_path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main
    from stages import cache_teacher
    from stages.config import CacheTeacherConfig

    config = CacheTeacherConfig(
        teacher=str(token_setup["teacher"]),
        data=str(token_setup["data"]),
        cache_dir=str(tmp_path / "c"),
        target_format="sampled",
        samples=8,
    )
    key = cache_teacher.run(config, progress=False, log=lambda m: None).path.name
    runner = CliRunner()
    listed = runner.invoke(
        main, ["caches", "list", "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "runs")]
    )
    assert listed.exit_code == 0 and "8 draws" in listed.output  # its targets, in its format's words
    shown = runner.invoke(
        main, ["caches", "show", key[:6], "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "runs")]
    )
    assert shown.exit_code == 0, shown.output
    assert "8 draws" in shown.output and "distinct ids drawn" in shown.output
    total = sum(len(s) for s in token_setup["seqs"])
    queried = runner.invoke(
        main,
        [
            "query",
            "SELECT count(*), sum(list_sum(sample_counts)), count(topk_ids) FROM positions",
            "--format",
            "csv",
            "--cache-dir",
            str(tmp_path / "c"),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
    )
    assert queried.exit_code == 0, queried.output
    assert queried.stdout.strip().splitlines()[-1].split(",") == [str(total), str(total * 8), "0"]
