"""Caches, datasets and runs on S3: both stages and the catalog against a real S3 API (moto's server on loopback).

The fixture starts moto's S3 server on 127.0.0.1 on a free port, points the standard AWS variables at it and
creates a bucket; everything then goes through pyarrow's own S3 client, as it would against AWS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from moto.server import ThreadedMotoServer

from pipeline.cli import main
from stages import cache_format as fmt
from stages import cache_teacher, storage, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.errors import ConfigError

BUCKET = "kd-test"
QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A fresh bucket on the loopback server, with the environment pointed at it; returns its s3:// URI."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata endpoint
    }.items():
        monkeypatch.setenv(name, value)
    storage._filesystem.cache_clear()  # the S3 client reads the endpoint when it is built
    client = boto3.client("s3", endpoint_url=s3_server)
    for bucket in client.list_buckets()["Buckets"]:  # each test starts from an empty store
        objects = client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", [])
        for obj in objects:
            client.delete_object(Bucket=bucket["Name"], Key=obj["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    client.create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    storage._filesystem.cache_clear()


def _upload(local, uri: str) -> str:
    (storage.location(uri)).write_bytes(local.read_bytes())
    return uri


def _config(setup: dict, cache_dir, data=None, **overrides) -> CacheTeacherConfig:
    return CacheTeacherConfig(
        teacher=str(setup["teacher"]), data=str(data or setup["data"]), cache_dir=str(cache_dir), **overrides
    )


def _shard_bytes(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.glob("shard-*.parquet")}


def test_cache_teacher_to_s3_equals_the_local_cache(classifier_setup, s3) -> None:
    local = cache_teacher.run(_config(classifier_setup, classifier_setup["cache_dir"], shard_size=128), **QUIET)
    remote = cache_teacher.run(_config(classifier_setup, f"{s3}/caches", shard_size=128), **QUIET)
    assert str(remote.path) == f"{s3}/caches/{local.path.name}"  # same key: where it lives is not identity
    assert _shard_bytes(remote.path) == _shard_bytes(local.path) and len(_shard_bytes(local.path)) == 3
    cache = fmt.open_cache(str(remote.path))
    cache.verify()  # every shard's sha256 against the manifest, read back from S3
    assert cache.manifest["num_positions"] == 300
    assert not (remote.path / fmt.LOCK).exists()  # the lease is gone once the writer finished
    again = cache_teacher.run(_config(classifier_setup, f"{s3}/caches", shard_size=128), **QUIET)
    assert again.hit


def test_dataset_on_s3_gives_the_same_key(classifier_setup, s3) -> None:
    data = _upload(classifier_setup["data"], f"{s3}/data/train/vec.parquet")
    local = cache_teacher.run(_config(classifier_setup, classifier_setup["cache_dir"]), **QUIET)
    remote = cache_teacher.run(_config(classifier_setup, f"{s3}/caches", data=f"{s3}/data/train"), **QUIET)
    assert remote.path.name == local.path.name  # the fingerprint is the data, not where it is read from
    assert remote.manifest["dataset"]["path"] == f"{s3}/data/train"
    assert data.endswith("vec.parquet")


def test_kill_and_resume_on_s3_equals_an_uninterrupted_cache(classifier_setup, s3, monkeypatch) -> None:
    whole = cache_teacher.run(_config(classifier_setup, f"{s3}/whole", shard_size=64), **QUIET)
    real_write, written = fmt.write_shard, []

    def dies_after_two(table, path, options=None):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process is stopped between shards
        written.append(path.name)
        return real_write(table, path, options)

    monkeypatch.setattr(fmt, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.run(_config(classifier_setup, f"{s3}/resumed", shard_size=64), **QUIET)
    cache_dir = storage.location(f"{s3}/resumed/{whole.path.name}")
    assert not (cache_dir / fmt.MANIFEST).exists()  # readers never see a partial cache
    with pytest.raises(Exception, match="incomplete"):
        fmt.open_cache(cache_dir)
    assert len(fmt.read_journal(cache_dir)) == 2

    monkeypatch.setattr(fmt, "write_shard", real_write)
    logs: list[str] = []
    resumed = cache_teacher.run(
        _config(classifier_setup, f"{s3}/resumed", shard_size=64), progress=False, log=logs.append
    )
    assert any("2 complete shard(s) kept" in m for m in logs)
    assert _shard_bytes(resumed.path) == _shard_bytes(whole.path) and len(_shard_bytes(whole.path)) == 5
    assert resumed.manifest["shards"] == whole.manifest["shards"]


@pytest.mark.slow  # two CLI processes and ~60 shards; the fast kill-and-resume test above covers the logic
def test_sigkill_and_resume_on_s3(classifier_setup, s3) -> None:
    """A real SIGKILL mid-run on S3: no manifest, the dead writer's lease is taken over, the resume is exact."""
    args = [sys.executable, "-m", "pipeline", "cache-teacher", "--teacher", str(classifier_setup["teacher"])]
    args += ["--data", str(classifier_setup["data"]), "--top-k", "3", "--shard-size", "5", "--batch-size", "1"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(args + ["--cache-dir", f"{s3}/killed", "--quiet"], env=env, stderr=subprocess.PIPE)
    root, journal = storage.location(f"{s3}/killed"), None
    deadline = time.time() + 60
    while journal is None and time.time() < deadline and proc.poll() is None:
        found = [d / fmt.JOURNAL for d in root.iterdir()] if root.exists() else []
        if found and found[0].exists() and len(found[0].read_text().splitlines()) >= 3:
            journal = found[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert journal is not None, proc.stderr.read().decode()
    cache_dir = journal.parent
    assert (cache_dir / fmt.LOCK).exists() and not (cache_dir / fmt.MANIFEST).exists()
    kept = len(fmt.read_journal(cache_dir))
    assert 3 <= kept < 60

    resumed = subprocess.run(args + ["--cache-dir", f"{s3}/killed"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} complete shard(s) kept" in resumed.stderr and resumed.stdout.strip() == str(cache_dir)
    fresh = cache_teacher.run(_config(classifier_setup, f"{s3}/fresh", top_k=3, shard_size=5), **QUIET)
    assert fmt.open_cache(cache_dir).manifest["shards"] == fresh.manifest["shards"]
    assert _shard_bytes(cache_dir) == _shard_bytes(fresh.path) and not (cache_dir / fmt.LOCK).exists()


def test_resume_recomputes_a_shard_that_no_longer_matches_its_journal(classifier_setup, s3) -> None:
    """A shard object overwritten after it was journalled (say, by a second writer) is redone, not trusted."""
    whole = cache_teacher.run(_config(classifier_setup, f"{s3}/c", shard_size=128), **QUIET)
    good = _shard_bytes(whole.path)
    (whole.path / fmt.MANIFEST).unlink()
    (whole.path / "shard-00001.parquet").write_bytes(b"not parquet")
    resumed = cache_teacher.run(_config(classifier_setup, f"{s3}/c", shard_size=128), **QUIET)
    assert not resumed.hit and _shard_bytes(resumed.path) == good


def test_launcher_free_workers_on_s3_give_the_single_process_cache(classifier_setup, s3) -> None:
    single = cache_teacher.run(_config(classifier_setup, f"{s3}/single", shard_size=64), **QUIET)
    first = cache_teacher.run(
        _config(classifier_setup, f"{s3}/w", shard_size=64, num_workers=2, worker_index=1), **QUIET
    )
    assert first.manifest == {} and not (first.path / fmt.MANIFEST).exists()
    assert not (first.path / fmt.WORKER_LOCK.format(1)).exists()  # the worker's lease is gone with it
    last = cache_teacher.run(
        _config(classifier_setup, f"{s3}/w", shard_size=64, num_workers=2, worker_index=0), **QUIET
    )
    assert (last.path / fmt.MANIFEST).is_file(), "the last worker to finish writes the manifest"
    assert _shard_bytes(last.path) == _shard_bytes(single.path) and last.manifest["shards"] == single.manifest["shards"]
    fmt.open_cache(str(last.path)).verify()


def test_a_held_lease_refuses_a_second_writer(classifier_setup, s3) -> None:
    key_dir = cache_teacher.run(_config(classifier_setup, f"{s3}/c"), **QUIET).path
    (key_dir / fmt.MANIFEST).unlink()
    (key_dir / fmt.LOCK).write_text(json.dumps({"host": "another-host", "pid": 1, "token": "x"}))
    with pytest.raises(Exception, match=r"another cache-teacher .* delete s3://.*/\.lock"):
        cache_teacher.run(_config(classifier_setup, f"{s3}/c"), **QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # its pid no longer runs once it is waited for
    dead.wait()
    (key_dir / fmt.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "y"}))
    assert not cache_teacher.run(_config(classifier_setup, f"{s3}/c"), **QUIET).hit  # a killed writer's lease
    assert not (key_dir / fmt.LOCK).exists()


def test_train_student_streams_from_an_s3_cache_and_s3_data_into_an_s3_run(classifier_setup, s3, tmp_path) -> None:
    data = _upload(classifier_setup["data"], f"{s3}/data/vec.parquet")
    cache = cache_teacher.run(_config(classifier_setup, f"{s3}/caches", data=data, top_k=4), **QUIET)
    common = dict(student="mlp:hidden=16", epochs=1, batch_size=32, alpha=0.5, seed=3, export_onnx=False)
    remote = train_student.run(
        TrainStudentConfig(
            data=data, cache=[cache.path.name], cache_dir=f"{s3}/caches", out=f"{s3}/runs/kd", eval_data=data, **common
        ),
        **QUIET,
    )
    local_cache = cache_teacher.run(_config(classifier_setup, tmp_path / "caches", top_k=4), **QUIET)
    local = train_student.run(
        TrainStudentConfig(
            data=str(classifier_setup["data"]),
            cache=[str(local_cache.path)],
            out=str(tmp_path / "kd"),
            eval_data=str(classifier_setup["data"]),
            **common,
        ),
        **QUIET,
    )
    compared = [k for k in local if k.startswith(("train_", "eval_", "test_")) and k != "train_seconds"]
    assert "test_accuracy" in compared and "train_kd" in compared
    for name in compared:
        assert remote[name] == pytest.approx(local[name], rel=1e-6), name  # same bytes in, same training
    with pytest.raises(ConfigError, match=r"run directory s3://kd-test/runs/kd exists and is not empty"):
        train_student.run(TrainStudentConfig(data=data, out=f"{s3}/runs/kd", **common | {"alpha": 0.0}), **QUIET)
    with pytest.raises(ConfigError, match=r"--resume: s3://kd-test/runs/kd2 is on an object store"):
        train_student.run(TrainStudentConfig(data=data, out=f"{s3}/runs/kd2", resume=True, **common), **QUIET)
    run = storage.location(f"{s3}/runs/kd")
    names = {p.name for p in run.iterdir()}
    assert {"metrics.json", "metrics.csv", "config.json", "checkpoint.safetensors"} <= names and ".lock" not in names
    assert json.loads((run / "config.json").read_text())["config"]["out"] == f"{s3}/runs/kd"
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] == remote["test_accuracy"]
    listed = _cli("runs", "list", "--runs-dir", f"{s3}/runs", "--cache-dir", f"{s3}/caches", "--format", "json")
    assert listed.exit_code == 0, listed.output
    assert [(r["run"], r["status"]) for r in json.loads(listed.output)] == [("kd", "complete")]
    reported = _cli(
        "report", "kd", "--out", str(tmp_path / "report"), "--runs-dir", f"{s3}/runs", "--cache-dir", f"{s3}/caches"
    )
    assert reported.exit_code == 0, reported.output
    page = (tmp_path / "report" / "report.md").read_text()
    assert "over 300 labelled examples" in page  # the teacher's reliability: S3 shards joined with S3 labels


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_caches_list_verify_and_query_on_s3(classifier_setup, s3, tmp_path) -> None:
    root = f"{s3}/caches"
    a = cache_teacher.run(_config(classifier_setup, root, top_k=3), **QUIET).path
    b = cache_teacher.run(_config(classifier_setup, root, top_k=5, shard_size=100), **QUIET).path
    roots = ["--cache-dir", root, "--runs-dir", str(tmp_path / "runs")]
    listed = _cli("caches", "list", *roots)
    assert listed.exit_code == 0, listed.output
    assert a.name in listed.output and b.name in listed.output
    sizes = json.loads(_cli("query", "SELECT key, bytes_on_disk FROM caches", "--format", "json", *roots).output)
    objects = {p.name: p.stat().st_size for p in a.iterdir()}
    assert {r["key"]: r["bytes_on_disk"] for r in sizes}[a.name] == sum(objects.values())
    verified = _cli("caches", "verify", *roots)
    assert verified.exit_code == 0 and f"ok    {a.name}" in verified.output, verified.output
    queried = _cli(
        "query", "SELECT cache_key, count(*) AS n FROM positions GROUP BY 1 ORDER BY 1", "--format", "json", *roots
    )
    assert queried.exit_code == 0, queried.output
    assert {r["cache_key"]: r["n"] for r in json.loads(queried.output)} == {a.name: 300, b.name: 300}

    shard = b / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = _cli("caches", "verify", *roots)
    assert bad.exit_code == 1 and "shard-00001.parquet" in bad.output and "sha256" in bad.output
    assert f"ok    {a.name}" in bad.output

    shown = _cli("caches", "show", a.name[:6], "--json", *roots)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["statistics"]["positions"] == 300  # DuckDB over the shards on S3

    leftover = storage.location(f"{root}/{'0' * 16}")
    (leftover / fmt.REQUEST).write_text("{}")  # an interrupted run's directory: no manifest
    assert "incomplete" in _cli("caches", "list", *roots).output
    collected = _cli("caches", "gc", *roots)
    assert collected.exit_code == 0 and "removed" in collected.output, collected.output
    assert not leftover.exists() and a.exists()

    typo = _cli("caches", "list", "--cache-dir", "s3://no-such-bucket/caches")
    assert typo.exit_code == 1 and "bucket 'no-such-bucket'" in typo.output and "does not exist" in typo.output

    removed = _cli("caches", "rm", b.name, "--yes", *roots)
    assert removed.exit_code == 0, removed.output
    assert not b.exists() and b.name not in _cli("caches", "list", *roots).output


@pytest.mark.parametrize(
    "uri, words",
    [
        ("s3:///no-bucket-name", ["names no bucket", "s3://BUCKET/PREFIX"]),
        ("s3://no-such-bucket/caches", ["bucket 'no-such-bucket'", "does not exist"]),
        ("nosuchscheme://x/y", ["no filesystem for 'nosuchscheme://'"]),
    ],
)
def test_bad_cache_uris_fail_in_one_line(classifier_setup, s3, uri, words) -> None:
    result = _cli(
        "cache-teacher", "--teacher", str(classifier_setup["teacher"]), "--data", str(classifier_setup["data"]),
        "--cache-dir", uri,
    )  # fmt: skip
    message = result.output.strip()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(message.splitlines()) == 1 and all(w in message for w in words), message


def test_missing_dataset_object_and_wrong_or_missing_credentials_fail_in_one_line(
    classifier_setup, s3, monkeypatch
) -> None:
    args = ["cache-teacher", "--teacher", str(classifier_setup["teacher"]), "--cache-dir", f"{s3}/c"]
    missing = _cli(*args, "--data", f"{s3}/nothing/here.parquet")
    assert missing.exit_code == 1 and "dataset not found: s3://kd-test/nothing/here.parquet" in missing.output

    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000")
    storage._filesystem.cache_clear()
    denied = _cli(*args, "--data", f"{s3}/data.parquet")
    message = denied.output.strip()
    assert denied.exit_code == 1 and len(message.splitlines()) == 1, denied.output
    assert "s3://kd-test/data.parquet" in message and "AWS_ACCESS_KEY_ID" in message

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # no credentials at all: the requests go out unsigned and are refused
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")  # nor from a profile on this machine
    storage._filesystem.cache_clear()
    anonymous = _cli(*args, "--data", f"{s3}/data.parquet")
    message = anonymous.output.strip()
    assert anonymous.exit_code == 1 and len(message.splitlines()) == 1, anonymous.output
    assert "s3://kd-test/data.parquet" in message and "AWS_ACCESS_KEY_ID" in message


def test_other_fsspec_uris_work_too(classifier_setup) -> None:
    """Any fsspec filesystem serves as a cache root; fsspec's in-memory one needs no server."""
    first = cache_teacher.run(_config(classifier_setup, "memory://kd/caches", shard_size=128), **QUIET)
    assert str(first.path).startswith("memory://") and len(_shard_bytes(first.path)) == 3
    fmt.open_cache(str(first.path)).verify()
    assert cache_teacher.run(_config(classifier_setup, "memory://kd/caches", shard_size=128), **QUIET).hit
    storage.rmtree(first.path)
