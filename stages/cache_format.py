"""The cache on disk: content key, Parquet shard schema, atomic writes, the manifest, and the verifying reader.

A cache is a directory named by its key::

    <root>/<key>/
        shard-00000.parquet ...   one row per cached position, in dataset order
        request.json              what is being cached and the shard size, written first (resume reads it)
        progress.jsonl            one line per finished shard (the resume journal; kept for the record)
        .lock                     flock held by the cache-teacher process writing the directory
        manifest.json             written LAST, atomically, only when every shard is complete

No manifest means not complete, whatever else is there. Shard row layout (FORMAT_VERSION 1):

    id          the dataset row's id (same Arrow type as the dataset)
    position    int32: 0 for classifiers; the token index for token-level teachers (padding is skipped)
    topk_ids    list<int32>[k]: ids sorted by descending teacher probability
    topk_logp   list<float32>[k]: log-probabilities at T under the FULL-vocabulary softmax
    logz        float32: logsumexp(logits / T); with topk_logp it recovers the raw top-k logits (re-tempering)
    tail_mass   float32: 1 - sum(exp(topk_logp)), the mass outside the cached ids (0 when k == V)
    hidden.<n>  list<float16>: flattened hidden state <n> (per example for classifiers, per position for tokens)

The sampled target format (manifest ``target_format: sampled``) replaces the four top-k columns with
``sample_ids`` list<int32> (the distinct ids drawn from softmax(logits / T), ascending) and ``sample_counts``
list<int16> (how often each was drawn; they sum to ``samples``).

Encodings: zstd; dictionary encoding only for ``id``; float16 is written PLAIN (DuckDB cannot read
float16 written with BYTE_STREAM_SPLIT).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.dataset import sha256_file
from stages.errors import CacheError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "progress.jsonl"
REQUEST = "request.json"
LOCK = ".lock"
SHARD_PATTERN = "shard-{:05d}.parquet"
HIDDEN_PREFIX = "hidden."
KEY_LENGTH = 16  # hex characters of sha256: 64 bits, ample for one machine's caches
ROW_GROUP_POSITIONS = 65_536  # row-group size: the streaming reader's unit of memory


def cache_key(request: dict) -> str:
    """Key from everything that determines a cache's content; the same request gives the same key."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def shard_schema(id_type: pa.DataType, hidden: list[str], target_format: str = "topk") -> pa.Schema:
    fields = [pa.field("id", id_type, nullable=False), pa.field("position", pa.int32(), nullable=False)]
    if target_format == "sampled":
        fields += [
            pa.field("sample_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("sample_counts", pa.list_(pa.int16()), nullable=False),
        ]
    else:
        fields += [
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logp", pa.list_(pa.float32()), nullable=False),
            pa.field("logz", pa.float32(), nullable=False),
            pa.field("tail_mass", pa.float32(), nullable=False),
        ]
    fields += [pa.field(HIDDEN_PREFIX + h, pa.list_(pa.float16()), nullable=False) for h in hidden]
    return pa.schema(fields)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(table: pa.Table, path: Path) -> dict:
    """Write one shard atomically (temp name, fsync, rename) and return its journal entry."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        use_dictionary=["id"],
        row_group_size=ROW_GROUP_POSITIONS,
        write_statistics=["id", "position", "logz", "tail_mass"],
    )
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"file": path.name, "rows": table.num_rows, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def try_lock(cache_dir: Path, create: bool = True):
    """An exclusive non-blocking flock on the cache's lock file, held until the returned handle closes (use it
    as a context manager); None when another process (a running cache-teacher) holds it.

    ``create=False`` (a dry run) leaves a directory without a lock file untouched: nobody can be holding it.
    Raises OSError when the lock file cannot be created.
    """
    if not create and not (cache_dir / LOCK).exists():
        return contextlib.nullcontext()
    handle = open(cache_dir / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def append_journal(cache_dir: Path, entry: dict) -> None:
    with open(cache_dir / JOURNAL, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_journal(cache_dir: Path) -> list[dict]:
    """Finished shards from an interrupted run, each re-checked against its file; stops at the first bad one.

    A torn last line (the process died mid-write) or a shard whose file is missing or changed ends the list:
    everything after it is recomputed, so a resumed cache equals an uninterrupted one.
    """
    path = cache_dir / JOURNAL
    if not path.exists():
        return []
    done = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        shard = cache_dir / entry.get("file", "")
        if entry.get("shard") != len(done) or not shard.is_file() or sha256_file(shard) != entry.get("sha256"):
            break
        done.append(entry)
    return done


@dataclass
class Cache:
    """A complete cache, opened through its manifest."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def target_format(self) -> str:
        return self.manifest.get("target_format", "topk")

    @property
    def samples(self) -> int:
        """Draws per position of a sampled cache (0 for top-k)."""
        return int(self.manifest.get("samples", 0))

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["teacher"]["num_classes"])

    @property
    def kind(self) -> str:
        return self.manifest["teacher"]["kind"]

    @property
    def hidden(self) -> dict[str, list[int]]:
        """Hidden-state name -> per-row shape (without the batch, or batch and sequence, axes)."""
        return self.manifest.get("hidden", {})

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def shard_path(self, shard: dict) -> Path:
        return self.path / shard["file"]

    def verify(self, checksums: bool = True) -> None:
        """Every shard present with the recorded row count (and sha256): raise CacheError naming the first fault."""
        for shard in self.shards:
            path = self.shard_path(shard)
            if not path.is_file():
                raise CacheError(
                    f"cache {self.path}: shard {shard['file']} is missing. Re-run cache-teacher to rebuild it."
                )
            rows = pq.ParquetFile(path).metadata.num_rows
            if rows != shard["rows"]:
                raise CacheError(
                    f"cache {self.path}: shard {shard['file']} has {rows} rows, manifest says {shard['rows']}"
                )
            if checksums and sha256_file(path) != shard["sha256"]:
                raise CacheError(
                    f"cache {self.path}: shard {shard['file']} fails its sha256 check (corrupted or modified). "
                    f"Remove the cache (pipeline caches rm {self.key}) and run cache-teacher again."
                )

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Row groups in dataset order: bounded memory however large the cache."""
        for shard in self.shards:
            pf = pq.ParquetFile(self.shard_path(shard))
            for g in range(pf.metadata.num_row_groups):
                yield pf.read_row_group(g, columns=columns)


def resolve_cache(ref: str, root: str | Path) -> Path:
    """A cache named by path, by key, or by a unique prefix of a key under ``root``."""
    as_path = Path(ref)
    if as_path.is_dir():
        return as_path
    root = Path(root)
    matches = sorted(p for p in root.glob(ref + "*") if p.is_dir()) if root.is_dir() and ref else []
    if not matches:
        raise CacheError(
            f"no cache matches '{ref}': not a directory, and no key under {root} starts with it. List caches with `pipeline caches list`."
        )
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches[:5])
        raise CacheError(
            f"'{ref}' is ambiguous: it starts {len(matches)} cache keys under {root} ({names}); give more characters"
        )
    return matches[0]


def open_cache(path: str | Path) -> Cache:
    """Open a complete cache; refuse an incomplete one or a format this code does not know."""
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"cache not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(
            f"cache {path} is incomplete (no {MANIFEST}): its run was interrupted or failed. "
            "Run the same cache-teacher command again to resume it."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"cache {path}: {MANIFEST} is not valid JSON ({exc})") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"cache {path} has format_version {version!r}; this pipeline reads version {FORMAT_VERSION}. "
            "Rebuild the cache with this version of cache-teacher."
        )
    for field in ("key", "teacher", "dataset", "top_k", "temperature", "shards", "num_positions"):
        if field not in manifest:
            raise CacheError(f"cache {path}: {MANIFEST} lacks the field '{field}'")
    return Cache(path, manifest)
