"""Cache integrity: a hand-edited manifest, a truncated shard and a full disk each end in one clean error.

Every check goes through the user's commands (``caches verify``, ``train-student``, ``caches show``,
``query``, ``cache-teacher``) with ``CliRunner``: exit 1, a message naming the problem, never a traceback,
and never a run that trained on what the cache does not hold.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_format as fmt
from stages import cache_teacher
from stages.config import CacheTeacherConfig
from stages.dataset import Dataset
from stages.errors import CacheError
from stages.loader import StreamingLoader


def _cache(setup: dict, cache_dir: Path | None = None, **overrides) -> Path:
    config = CacheTeacherConfig(
        teacher=str(setup["teacher"]),
        data=str(setup["data"]),
        cache_dir=str(cache_dir or setup["cache_dir"]),
        **({"top_k": 4, "shard_size": 128, "hidden": ["hidden"]} | overrides),
    )
    return cache_teacher.run(config, progress=False, log=lambda m: None).path


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(result, *words: str) -> None:
    """Exit 1 with a message, no traceback: the error went through the CLI's PipelineError boundary."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def _train(setup: dict, cache: Path, out: Path):
    return _cli(
        "train-student",
        "--data",
        setup["data"],
        "--cache",
        cache,
        "--student",
        "mlp:hidden=8",
        "--epochs",
        "1",
        "--out",
        out,
        "--no-onnx",
        "--quiet",
    )


def _edit(cache: Path, change, seal: bool = False) -> None:
    """Apply ``change`` to the manifest dict and write it back; ``seal`` recomputes the checksum (a careful forger)."""
    m = json.loads((cache / fmt.MANIFEST).read_text())
    change(m)
    if seal:
        m[fmt.MANIFEST_CHECKSUM] = fmt.manifest_checksum(m)
    (cache / fmt.MANIFEST).write_text(json.dumps(m, indent=2))


def _set(*path_and_value):
    *path, value = path_and_value

    def change(m: dict) -> None:
        node = m
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


def test_manifest_carries_a_checksum_of_its_content_not_its_bytes(classifier_setup) -> None:
    cache = _cache(classifier_setup)
    m = json.loads((cache / fmt.MANIFEST).read_text())
    assert m[fmt.MANIFEST_CHECKSUM] == fmt.manifest_checksum(m)
    # Re-serialised with other key order and spacing, the content is the same: still accepted.
    (cache / fmt.MANIFEST).write_text(json.dumps(m, sort_keys=True))
    opened = fmt.open_cache(cache)
    opened.verify()
    assert opened.checksummed


def test_edited_top_k_is_refused_by_verify_train_student_and_listed_as_unreadable(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    cache = _cache(s)
    _edit(cache, _set("top_k", 3))  # the edit: 4 cached ids per position, the manifest claims 3

    roots = ["--cache-dir", s["cache_dir"], "--runs-dir", tmp_path / "runs"]
    _refused(_cli("caches", "verify", *roots), "FAIL", cache.name, fmt.MANIFEST_CHECKSUM)
    _refused(_cli("caches", "verify", "--fast", *roots), "FAIL", fmt.MANIFEST_CHECKSUM)
    out = tmp_path / "run"
    _refused(_train(s, cache, out), "was changed after cache-teacher wrote it", f"caches rm {cache.name}")
    assert not (out / "metrics.json").exists()

    listing = _cli("caches", "list", *roots)
    assert listing.exit_code == 0, listing.output
    assert "unreadable" in listing.output and "complete" not in listing.output


@pytest.mark.parametrize(
    "change",
    [
        _set("temperature", 3.0),
        _set("teacher", "num_classes", 12),
        _set("num_positions", 299),
        _set("shards", 0, "rows", 127),
        _set("hidden", "hidden", [8]),
        _set("dataset", "id_type", "int32"),
    ],
    ids=["temperature", "num_classes", "num_positions", "shard_rows", "hidden_shape", "id_type"],
)
def test_any_other_manifest_edit_is_refused(classifier_setup, tmp_path, change) -> None:
    s = classifier_setup
    cache = _cache(s)
    _edit(cache, change)
    roots = ["--cache-dir", s["cache_dir"], "--runs-dir", tmp_path / "runs"]
    _refused(_cli("caches", "verify", cache.name, *roots), "FAIL", fmt.MANIFEST_CHECKSUM)
    _refused(_train(s, cache, tmp_path / "run"), "was changed after cache-teacher wrote it")
    assert not (tmp_path / "run" / "metrics.json").exists()


# -- caches written before checksums: accepted with a note, still cross-checked against key and shards ----------


def _legacy(cache: Path) -> None:
    _edit(cache, lambda m: m.pop(fmt.MANIFEST_CHECKSUM))


def test_pre_checksum_cache_is_accepted_with_a_note(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    cache = _cache(s)
    _legacy(cache)
    result = _cli("caches", "verify", "--cache-dir", s["cache_dir"], "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert f"ok    {cache.name}" in result.output and "no manifest checksum" in result.output
    assert not fmt.open_cache(cache).checksummed


def _rekeyed(*path_and_value):
    """Change a request field everywhere (manifest, request, key): only the shards can still tell."""
    *path, value = path_and_value

    def change(m: dict) -> None:
        _set(*path, value)(m)
        m["request"][path[-1]] = value
        m["key"] = fmt.cache_key(m["request"])

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set("top_k", 3), ["says top_k 3", "request", "says 4"]),
        (_set("temperature", 3.0), ["says temperature 3.0", "says 1.0"]),
        (lambda m: m["request"].update(top_k=3), ["not the hash of its request"]),
        (_rekeyed("top_k", 3), ["shard-00000.parquet", "holds 4 'topk_ids' values per position", "top_k 3"]),
        (_set("hidden", "hidden", [8]), ["shard-00000.parquet", "holds 16 'hidden.hidden' values", "[8]"]),
        (_set("num_positions", 301), ["num_positions 301", "shards hold 300"]),
        (_set("shards", 1, "rows", 127), ["shard-00001.parquet has 127 positions for 128 examples"]),
        (_set("dataset", "id_type", "int32"), ["shard-00000.parquet has ids of type int64", "int32"]),
        (_set("shards", 0, "file", "../elsewhere.parquet"), ["malformed shard entry"]),
    ],
    ids=["top_k", "temperature", "request", "top_k_rekeyed", "hidden", "positions", "rows", "id_type", "file"],
)
def test_pre_checksum_cache_is_still_cross_checked(classifier_setup, tmp_path, change, words) -> None:
    s = classifier_setup
    cache = _cache(s)
    _legacy(cache)
    _edit(cache, change)
    _refused(
        _cli("caches", "verify", "--fast", "--cache-dir", s["cache_dir"], "--runs-dir", tmp_path / "runs"),
        "FAIL",
        *words,
    )
    _refused(_train(s, cache, tmp_path / "run"), *words)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_pre_checksum_cache_with_too_few_classes_is_refused_when_read(classifier_setup) -> None:
    # num_classes is not in the key and not in the Parquet metadata: the loader sees ids past it and refuses.
    s = classifier_setup
    cache = _cache(s)
    _legacy(cache)
    _edit(cache, _set("teacher", "num_classes", 4))
    opened = fmt.open_cache(cache)
    opened.verify()
    loader = StreamingLoader(Dataset(str(s["data"])), [opened], input_columns=["x"], batch_size=50, token_level=False)
    with pytest.raises(CacheError, match="holds class id 9, but the manifest says the teacher has 4 classes"):
        next(iter(loader))


# -- truncated shards -----------------------------------------------------------------------------------------


def test_truncated_shard_gives_clean_errors_everywhere(classifier_setup, tmp_path) -> None:
    s = classifier_setup
    cache = _cache(s)
    shard = cache / "shard-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    roots = ["--cache-dir", s["cache_dir"], "--runs-dir", tmp_path / "runs"]
    words = ["shard-00001.parquet", "truncated or corrupted", f"caches rm {cache.name}"]

    _refused(_cli("caches", "verify", *roots), "FAIL", *words)
    _refused(_cli("caches", "verify", "--fast", *roots), "FAIL", *words)
    _refused(_train(s, cache, tmp_path / "run"), *words)
    assert not (tmp_path / "run" / "metrics.json").exists()
    _refused(_cli("caches", "show", cache.name, *roots), *words)
    _refused(_cli("query", "SELECT count(*) FROM positions", *roots), *words)

    opened = fmt.open_cache(cache)  # the readers that skip verify (the loader, iter_tables) refuse too
    with pytest.raises(CacheError, match="shard-00001.parquet cannot be read"):
        list(opened.iter_tables())
    loader = StreamingLoader(
        Dataset(str(s["data"])), [opened], input_columns=["x"], batch_size=300, token_level=False, shuffle=False
    )
    with pytest.raises(CacheError, match="shard-00001.parquet cannot be read"):
        list(loader)


# -- a full disk while caching --------------------------------------------------------------------------------


def _run_cli(setup: dict, cache_dir: Path):
    return _cli(
        "cache-teacher",
        "--teacher",
        setup["teacher"],
        "--data",
        setup["data"],
        "--cache-dir",
        cache_dir,
        "--top-k",
        "4",
        "--shard-size",
        "64",
        "--hidden",
        "hidden",
        "--quiet",
    )


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.parquet"))}


def test_disk_full_keeps_complete_shards_and_resumes_to_an_identical_cache(classifier_setup, tmp_path, monkeypatch):
    s = classifier_setup
    write_table = pq.write_table
    calls = []

    def full_at_shard_2(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:
            Path(where).write_bytes(b"PAR1 half a shard")  # the device filled up part way through the file
            raise OSError(errno.ENOSPC, "No space left on device")
        write_table(table, where, **kwargs)

    monkeypatch.setattr(fmt.pq, "write_table", full_at_shard_2)
    failed = _run_cli(s, tmp_path / "full")
    monkeypatch.undo()
    [cache] = (tmp_path / "full").iterdir()
    _refused(
        failed,
        "disk full while writing shard-00002.parquet: 2 complete shard(s) kept in",
        "free space and re-run the same command to resume",
    )
    assert not list(cache.glob("*.tmp")) and not (cache / fmt.MANIFEST).exists()
    assert sorted(p.name for p in cache.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert len(fmt.read_journal(cache)) == 2

    resumed = _run_cli(s, tmp_path / "full")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "2 complete shard(s) kept" in resumed.output
    fresh = _run_cli(s, tmp_path / "fresh")
    assert fresh.exit_code == 0, fresh.output
    assert _shard_bytes(cache) == _shard_bytes(tmp_path / "fresh" / cache.name)
    assert len(_shard_bytes(cache)) == 5
    fmt.open_cache(cache).verify()


def test_disk_full_at_the_manifest_resumes_without_recomputing(classifier_setup, tmp_path, monkeypatch):
    s = classifier_setup
    dump = json.dump

    def full_at_manifest(obj, fh, **kwargs):
        if fh.name.endswith(fmt.MANIFEST + ".tmp"):
            fh.write('{"format_version": 1, "ke')
            fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        dump(obj, fh, **kwargs)

    monkeypatch.setattr(fmt.json, "dump", full_at_manifest)
    failed = _run_cli(s, tmp_path / "full")
    monkeypatch.undo()
    [cache] = (tmp_path / "full").iterdir()
    _refused(failed, "disk full while writing manifest.json: 5 complete shard(s) kept in", str(cache))
    assert not list(cache.glob("*.tmp")) and not (cache / fmt.MANIFEST).exists()

    resumed = _run_cli(s, tmp_path / "full")
    assert resumed.exit_code == 0, resumed.output
    assert "5 complete shard(s) kept" in resumed.output
    opened = fmt.open_cache(cache)
    opened.verify()
    # No shard was computed on the resume, yet the manifest knows the hidden shape and the vocabulary.
    assert opened.hidden == {"hidden": [16]} and opened.num_classes == 10
    assert opened.manifest["run"]["positions"] == 0
