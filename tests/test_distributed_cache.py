"""Stage one split over workers: launcher-free workers (in process) and torchrun ranks (2 CPU processes, gloo).

Every split must give the shards of a single process byte for byte, under the same key.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_format as fmt
from stages import cache_teacher, distributed
from stages.config import CacheTeacherConfig
from stages.errors import CacheError, ConfigError, DistributedError
from tests import teachers
from tests.torchrun import rank_pid

ROOT = Path(__file__).resolve().parents[1]


def _config(setup: dict, cache_dir: Path, **overrides) -> CacheTeacherConfig:
    return CacheTeacherConfig(
        teacher=str(setup["teacher"]),
        data=str(setup["data"]),
        cache_dir=str(cache_dir),
        top_k=4,
        shard_size=64,
        hidden=["hidden"],
        **overrides,
    )


def _shards(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("shard-*.parquet"))}


def _quiet(config: CacheTeacherConfig) -> cache_teacher.CacheResult:
    return cache_teacher.run(config, progress=False, log=lambda m: None)


def test_launcher_free_workers_give_the_single_process_cache(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    single = _quiet(_config(s, tmp_path / "single"))
    first = _quiet(_config(s, tmp_path / "workers", num_workers=2, worker_index=1))
    assert first.path.name == single.path.name, "the split is not part of the key"
    assert first.manifest == {} and not (first.path / fmt.MANIFEST).exists(), "worker 0 has not run yet"
    assert sorted(_shards(first.path)) == ["shard-00001.parquet", "shard-00003.parquet"]  # 300 rows: 5 shards
    last = _quiet(_config(s, tmp_path / "workers", num_workers=2, worker_index=0))
    assert (last.path / fmt.MANIFEST).is_file(), "the last worker to finish writes the manifest"
    assert _shards(last.path) == _shards(single.path)
    assert last.manifest["shards"] == single.manifest["shards"]
    assert [(w["worker"], w["shards"]) for w in last.manifest["workers"]] == [(0, 3), (1, 2)]
    assert sorted(p.name for p in last.path.glob("progress*")) == ["progress-00000.jsonl", "progress-00001.jsonl"]
    fmt.open_cache(last.path).verify()


def test_caches_commit_seals_what_no_worker_could(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    _quiet(_config(s, tmp_path / "c", num_workers=2, worker_index=0))
    [cache] = (tmp_path / "c").iterdir()
    args = ["caches", "commit", cache.name, "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "lacks 2 of its 5 shards (shard 1, 3)" in refused.output
    with open(cache / fmt.LOCK, "a") as other:  # a third worker still holds its share when worker 1 finishes
        fcntl.flock(other, fcntl.LOCK_SH)
        busy = CliRunner().invoke(main, args)
        assert busy.exit_code == 1 and "still writing" in busy.output
        _quiet(_config(s, tmp_path / "c", num_workers=2, worker_index=1))
    assert not (cache / fmt.MANIFEST).exists()
    committed = CliRunner().invoke(main, args)
    assert committed.exit_code == 0, committed.output
    assert committed.stdout.strip().splitlines()[-1] == str(cache)
    single = _quiet(_config(s, tmp_path / "single"))
    assert _shards(cache) == _shards(single.path)
    assert fmt.open_cache(cache).manifest["shards"] == single.manifest["shards"]


def test_a_worker_resumes_its_own_shards_only(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    _quiet(_config(s, tmp_path / "c", num_workers=2, worker_index=0))
    [cache] = (tmp_path / "c").iterdir()
    (cache / "shard-00002.parquet").write_bytes(b"PAR1 torn")  # damaged after its journal line was written
    logs: list[str] = []
    cache_teacher.run(_config(s, tmp_path / "c", num_workers=2, worker_index=0), progress=False, log=logs.append)
    assert any("2 complete shard(s) kept" in m for m in logs), logs  # shards 0 and 4; 2 is recomputed
    assert sorted(_shards(cache)) == ["shard-00000.parquet", "shard-00002.parquet", "shard-00004.parquet"]
    assert len(fmt.read_journal(cache)) == 3


def test_the_same_worker_twice_is_refused(classifier_setup, tmp_path) -> None:
    config = _config(classifier_setup, tmp_path / "c", num_workers=2, worker_index=1)
    _quiet(_config(classifier_setup, tmp_path / "c", num_workers=2, worker_index=0))
    [cache] = (tmp_path / "c").iterdir()
    with open(cache / fmt.WORKER_LOCK.format(1), "a") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(CacheError, match="worker 1 of 2 is already writing"):
            _quiet(config)


def test_worker_options_are_checked() -> None:
    problems = CacheTeacherConfig(teacher="t", data="d", num_workers=2, worker_index=2).problems()
    assert any("0 <= worker_index < num_workers" in p for p in problems)
    group = distributed.Group(rank=1, world_size=2, local_rank=1, timeout=5)
    with pytest.raises(ConfigError, match="under torchrun the 2 ranks are the workers"):
        cache_teacher._worker(CacheTeacherConfig(num_workers=2), group)
    assert cache_teacher._worker(CacheTeacherConfig(), group) == (1, 2)


def test_a_lost_peer_is_a_distributed_error() -> None:
    group = distributed.Group(rank=0, world_size=2, local_rank=0, timeout=5)
    with pytest.raises(DistributedError, match="rank 0 of 2: gathering failed, because another rank stopped") as info:
        with group.collective("gathering"):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert "re-run the same command to resume" in str(info.value)


# -- torchrun: 2 processes on CPU ------------------------------------------------------------------------------


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command + ["-m", "pipeline", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _cache_args(tmp_path: Path, cache_dir: Path, rows: int, shard_size: int) -> list[str]:
    if not (tmp_path / "clf.onnx").exists():
        teachers.make_classifier(tmp_path / "clf.onnx")
        x = np.random.default_rng(3).normal(size=(rows, 8)).astype(np.float32)
        teachers.write_vectors(tmp_path / "vec.parquet", x)
    return [
        "cache-teacher",
        *("--teacher", str(tmp_path / "clf.onnx"), "--data", str(tmp_path / "vec.parquet")),
        *("--top-k", "3", "--shard-size", str(shard_size), "--batch-size", "5", "--threads", "1"),
        *("--cache-dir", str(cache_dir), "--quiet"),
    ]


def _single(args: list[str]) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.decode().strip().splitlines()[-1])


def test_torchrun_two_ranks_write_the_single_process_cache(tmp_path) -> None:
    job = _torchrun(_cache_args(tmp_path, tmp_path / "two", rows=300, shard_size=40))
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    paths = set(out.strip().splitlines())
    assert len(paths) == 1, "every rank prints the one cache path"
    cache = Path(paths.pop())
    single = _single(_cache_args(tmp_path, tmp_path / "one", rows=300, shard_size=40))
    assert cache.name == single.name
    assert _shards(cache) == _shards(single) and len(_shards(cache)) == 8
    manifest = fmt.open_cache(cache).manifest
    assert manifest["shards"] == fmt.open_cache(single).manifest["shards"]
    assert manifest["workers"] == [
        {"worker": 0, "providers": ["CPUExecutionProvider"], "shards": 4},
        {"worker": 1, "providers": ["CPUExecutionProvider"], "shards": 4},
    ]
    assert "worker 0 of 2: cached 300 positions in 8 shard(s)" in err


@pytest.mark.slow
def test_torchrun_kill_of_one_rank_fails_the_job_and_a_rerun_resumes(tmp_path) -> None:
    args = _cache_args(tmp_path, tmp_path / "killed", rows=4000, shard_size=10)
    job = _torchrun(args)
    journal, victim, deadline = None, None, time.time() + 90
    while time.time() < deadline and job.poll() is None:
        found = list((tmp_path / "killed").glob("*/" + fmt.WORKER_JOURNAL.format(1)))
        if found and len(found[0].read_text().splitlines()) >= 3:
            journal, victim = found[0], rank_pid(job.pid, 1)
            break
        time.sleep(0.01)
    assert journal is not None and victim is not None, "rank 1 never wrote a shard"
    os.kill(victim, signal.SIGKILL)
    started = time.time()
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0, "the job must fail when one rank dies"
    assert time.time() - started < 60, "the surviving rank must not hang"
    assert "SIGKILL" in err, err[-2000:]
    cache = journal.parent
    assert not (cache / fmt.MANIFEST).exists()
    kept = len(fmt.read_journal(cache))
    assert 0 < kept < 400

    rerun = _torchrun(args)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    assert "resuming" in err
    single = _single(_cache_args(tmp_path, tmp_path / "one", rows=4000, shard_size=10))
    assert cache.name == single.name
    assert _shards(cache) == _shards(single) and len(_shards(cache)) == 400
    fmt.open_cache(cache).verify()
