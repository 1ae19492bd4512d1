"""The cache on disk: content key, Parquet shard schema, the manifest and the verifying reader. How each file is
written (atomically, the journal, the locks) is ``stages.cache_write``'s, whose names this module re-exports.

A cache is a directory named by its key::

    <root>/<key>/
        shard-00000.parquet ...   one row per cached position, in dataset order
        request.json              what is being cached and the shard size, written first (resume reads it)
        progress.jsonl            one line per finished shard (the resume journal; kept for the record)
        progress-00001.jsonl ...  the same, one per worker, when several workers (torchrun ranks) write
        .lock                     flock held by the cache-teacher process writing the directory (shared by workers)
        .lock-00001 ...           flock of one worker of several: the same worker never runs twice at once
        manifest.json             written LAST, atomically, only when every shard is complete

No manifest means not complete, whatever else is there. The manifest carries ``manifest_sha256``, the sha256
of the canonical JSON of every other field, so an edit is caught; it must agree with itself (manifest_checks)
and, in ``Cache.verify``, with the shards' Parquet metadata (schema, id type, row counts, list sizes).

The root may be an object store (``s3://bucket/prefix``, see stages.storage). There is no rename there, so each
shard and JSON file is written as one object (a PUT appears whole or not at all), the journal is rewritten whole
after each shard, and the manifest is still written last; a resume re-checks every journalled shard's sha256.
Instead of flock, ``.lock`` is a lease object naming its holder (host, pid), deleted when the writer finishes.

Shard row layout (FORMAT_VERSION 1):

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

Top-k caches in the fp16 or int8 encoding (manifest ``encoding``, ``format_version`` 2) store ids and log-probs
in the columns of their class in ``stages.formats.topk``; every reader decodes them back to the layout above.
Top-p caches (manifest ``top_p`` and ``min_k``, ``format_version`` 3, any encoding) hold min_k..top_k values per
position in those list columns: each position's smallest prefix of its top-k reaching probability top_p.

Encodings: zstd; dictionary encoding only for ``id``; float16 is written PLAIN (DuckDB cannot read
float16 written with BYTE_STREAM_SPLIT).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages import storage
from stages.cache_write import (  # noqa: F401  the writing side's names, re-exported: callers spell them fmt.NAME
    JOURNAL,
    LOCK,
    ROW_GROUP_POSITIONS,
    WORKER_JOURNAL,
    WORKER_LOCK,
    append_journal,
    claim_json,
    journal_path,
    read_journal,
    temp_for,
    try_lock,
    write_json_atomic,
    write_shard,
)
from stages.dataset import sha256_file
from stages.errors import CacheError
from stages.formats import DEFAULT_FORMAT, TargetFormat, format_of, get_format
from stages.manifest_checks import manifest_problem
from stages.storage import ObjectPath

FORMAT_VERSION = 1  # hashed into every key: fixed, so caches keep their keys as formats are added
READ_VERSIONS = (1, 2, 3)  # manifest format_versions this reader knows: 2 = fp16 and int8, 3 = top-p lists
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest_sha256"  # absent from caches written before checksums (see open_cache)
REQUEST = "request.json"
SHARD_PATTERN = "shard-{:05d}.parquet"
HIDDEN_PREFIX = "hidden."
KEY_LENGTH = 16  # hex characters of sha256: 64 bits, ample for one machine's caches


def cache_key(request: dict) -> str:
    """Key from everything that determines a cache's content; the same request gives the same key."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def shard_schema(id_type: pa.DataType, hidden: list[str], target_format: TargetFormat | None = None) -> pa.Schema:
    fields = [pa.field("id", id_type, nullable=False), pa.field("position", pa.int32(), nullable=False)]
    fields += (target_format or get_format(DEFAULT_FORMAT)).fields()
    fields += [pa.field(HIDDEN_PREFIX + h, pa.list_(pa.float16()), nullable=False) for h in hidden]
    return pa.schema(fields)


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of every manifest field but the checksum itself.

    JSON round-trips Python's ints, floats and strings exactly, so the checksum recomputed from the file
    equals the one computed from the dict that was written.
    """
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(manifest: dict, cache_dir: Path | ObjectPath) -> dict:
    """Seal the manifest with its checksum and write it atomically: the last step of a complete cache."""
    sealed = manifest | {MANIFEST_CHECKSUM: manifest_checksum(manifest)}
    write_json_atomic(sealed, cache_dir / MANIFEST)
    return sealed


@dataclass
class Cache:
    """A complete cache, opened through its manifest."""

    path: Path | ObjectPath
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def target_format(self) -> str:
        return self.format.name

    @property
    def format(self) -> TargetFormat:
        """The target format object that reads, checks and describes this cache's targets."""
        return format_of(self.manifest)

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

    def shard_path(self, shard: dict) -> Path | ObjectPath:
        return self.path / shard["file"]

    @property
    def checksummed(self) -> bool:
        """False for a cache written before manifests carried their checksum (still readable: see open_cache)."""
        return MANIFEST_CHECKSUM in self.manifest

    def _fault(self, shard: dict, problem: str) -> CacheError:
        return CacheError(
            f"cache {self.path}: shard {shard['file']} {problem}. "
            f"Remove the cache (pipeline caches rm {self.path.name}) and run cache-teacher again."
        )

    @contextmanager
    def _reading(self, shard: dict) -> Iterator[None]:
        """A truncated, corrupt or vanished shard becomes a CacheError naming it, not an ArrowInvalid traceback."""
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            raise self._fault(shard, f"cannot be read, it is truncated or corrupted ({exc})") from exc

    def parquet_file(self, shard: dict) -> pq.ParquetFile:
        with self._reading(shard):
            return pq.ParquetFile(storage.open_input(self.shard_path(shard)))

    def read_shard(self, shard: dict, columns: list[str] | None = None) -> pa.Table:
        with self._reading(shard):
            return pq.read_table(storage.open_input(self.shard_path(shard)), columns=columns)

    def verify(self, checksums: bool = True) -> None:
        """Check every shard against the manifest; raise CacheError naming the first fault.

        From each shard's Parquet footer (cheap): present and readable, the schema the manifest's target format,
        hidden states and id type imply, the row count, and the list sizes that decoding relies on (top_k entries
        and each hidden state's size per position). With ``checksums``, also the sha256 of every shard's bytes.
        """
        for shard in self.shards:
            path = self.shard_path(shard)
            if not path.is_file():
                raise CacheError(
                    f"cache {self.path}: shard {shard['file']} is missing. Remove the cache (pipeline caches rm "
                    f"{self.path.name}) and run its cache-teacher command again to rebuild it."
                )
            self._check_shard(shard, self.parquet_file(shard))
            if checksums and sha256_file(path) != shard["sha256"]:
                raise self._fault(shard, "fails its sha256 check (corrupted or modified)")

    def _check_shard(self, shard: dict, pf: pq.ParquetFile) -> None:
        schema, meta = pf.schema_arrow, pf.metadata
        id_type = schema.field("id").type if "id" in schema.names else pa.null()
        expected = shard_schema(id_type, list(self.hidden), self.format)
        if not schema.equals(expected):
            raise self._fault(
                shard,
                f"has the columns {schema.names}, but the manifest ({self.target_format} targets, hidden states "
                f"{list(self.hidden)}) implies {expected.names} with the types of shard_schema",
            )
        recorded = self.manifest["dataset"].get("id_type")
        if str(id_type) != recorded:
            raise self._fault(shard, f"has ids of type {id_type}, the manifest says {recorded}")
        rows = meta.num_rows
        if rows != shard["rows"]:
            raise self._fault(shard, f"has {rows} rows, the manifest says {shard['rows']}")
        # Every column is one Parquet leaf (a scalar, or a list of scalars), so leaf j is field j; a list leaf's
        # value count over all row groups is the sum of its list sizes: list sizes checked without decoding.
        values = {
            name: sum(meta.row_group(g).column(j).num_values for g in range(meta.num_row_groups))
            for j, name in enumerate(schema.names)
        }
        sizes = {
            HIDDEN_PREFIX + n: (math.prod(shape), f"hidden state '{n}' of shape {shape}")
            for n, shape in self.hidden.items()
        }
        problem, target_sizes = self.format.size_problem(values, rows, self.manifest)
        if problem:
            raise self._fault(shard, problem)
        sizes |= target_sizes
        for column, (size, what) in sizes.items():
            if values[column] != rows * size:
                per_position = values[column] / max(rows, 1)
                raise self._fault(
                    shard,
                    f"holds {per_position:g} '{column}' values per position, but the manifest's {what} means {size}",
                )

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Row groups in dataset order: bounded memory however large the cache."""
        for shard in self.shards:
            pf = self.parquet_file(shard)
            for g in range(pf.metadata.num_row_groups):
                with self._reading(shard):
                    table = pf.read_row_group(g, columns=columns)
                yield table  # outside the error guard: the consumer's own errors are not the shard's


def export_plain(cache: Cache, out: Path) -> int:
    """Write a top-k cache's targets, decoded, in format 1's plain schema (id, position, topk_ids, topk_logp,
    logz, tail_mass: float32 log-probs by descending probability) to one Parquet file, for other tools.

    A row group at a time (bounded memory), to a temp name renamed at the end. Returns the rows written.
    """
    schema = shard_schema(cache.parquet_file(cache.shards[0]).schema_arrow.field("id").type, [])
    rows = 0
    with temp_for(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=["id"]) as writer:
            for table in cache.iter_tables(["id", "position", *cache.format.columns]):
                plain = {"id": table.column("id"), "position": table.column("position")}
                writer.write_table(pa.table(plain | cache.format.plain(table, cache.manifest), schema=schema))
                rows += table.num_rows
        os.replace(tmp, out)
    return rows


def resolve_cache(ref: str, root: str | Path | ObjectPath) -> Path | ObjectPath:
    """A cache named by path or URI, by key, or by a unique prefix of a key under ``root``."""
    if not ref.strip():
        raise CacheError("the cache reference is empty: give a cache directory, a key or a key prefix")
    as_path = storage.location(ref)
    if as_path.is_dir():
        return as_path
    root = storage.location(root)
    # A key prefix is a plain name, matched literally (no glob): a path that is not a directory matches nothing.
    plain = "/" not in ref and ref not in (".", "..")
    matches = (
        sorted(p for p in root.iterdir() if p.name.startswith(ref) and p.is_dir()) if plain and root.is_dir() else []
    )
    if not matches:
        raise CacheError(
            f"no cache matches '{ref}': not a directory, and no key under {root} starts with it. "
            "List caches with `pipeline caches list`."
        )
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches[:5])
        raise CacheError(
            f"'{ref}' is ambiguous: it starts {len(matches)} cache keys under {root} ({names}); give more characters"
        )
    return matches[0]


def open_cache(path: str | Path | ObjectPath) -> Cache:
    """Open a complete cache; refuse an incomplete one or a format this code does not know."""
    path = storage.location(path)
    if not path.is_dir():
        raise CacheError(f"cache not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() and not (path / REQUEST).is_file():
        raise CacheError(
            f"{path} holds no cache (neither {MANIFEST} nor {REQUEST}), or one whose cache-teacher stopped before "
            "it began: give a cache's directory, key or key prefix (`pipeline caches list`), or run that "
            "cache-teacher command again"
        )
    if not manifest_path.is_file():
        raise CacheError(
            f"cache {path} is incomplete (no {MANIFEST}): its run was interrupted or failed. "
            "Run the same cache-teacher command again to resume it."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"cache {path}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CacheError(
            f"cache {path}: {MANIFEST} is not a JSON object. Remove the cache and run cache-teacher again."
        )
    version = manifest.get("format_version")
    if version not in READ_VERSIONS:
        raise CacheError(
            f"cache {path} has format_version {version!r}; this pipeline reads versions {READ_VERSIONS}. "
            "Rebuild the cache with this version of cache-teacher."
        )
    rm = f"pipeline caches rm {path.name}"
    fix = f"Remove the cache ({rm}) and run cache-teacher again."
    for field in ("key", "teacher", "dataset", "top_k", "temperature", "shards", "num_positions", "request"):
        if field not in manifest:
            raise CacheError(f"cache {path}: {MANIFEST} lacks the field '{field}'. {fix}")
    recorded = manifest.get(MANIFEST_CHECKSUM)
    if recorded is not None and recorded != manifest_checksum(manifest):
        raise CacheError(
            f"cache {path}: {MANIFEST} was changed after cache-teacher wrote it (it no longer matches its "
            f"{MANIFEST_CHECKSUM}), so its targets cannot be trusted. Restore the original {MANIFEST}, "
            f"or remove the cache ({rm}) and run cache-teacher again."
        )
    request_key = cache_key(manifest["request"]) if isinstance(manifest["request"], dict) else None
    problem = manifest_problem(manifest, request_key)
    if problem:
        raise CacheError(f"cache {path}: {MANIFEST} {problem}; it was edited or damaged. {fix}")
    return Cache(path, manifest)
