"""How stage one writes a cache's files so that each appears whole or not at all, on a local disk or an object store.

Shards and JSON files go to a temp name, are fsynced and renamed (on an object store: one PUT each);
``claim_json`` lets the first of several workers write request.json; the journal (``progress.jsonl``, one per
worker when several write) records each finished shard with its sha256 so a resumed run re-checks it; and
``try_lock`` gives a writer its hold on the directory (flock, or a lease object on an object store).
``stages.cache_format`` owns the cache's layout, manifest and reader, and re-exports these names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.dataset import sha256_file
from stages.storage import ObjectPath

JOURNAL = "progress.jsonl"
WORKER_JOURNAL = "progress-{:05d}.jsonl"  # worker I's journal when several write (each appends to its own only)
LOCK = ".lock"
WORKER_LOCK = ".lock-{:05d}"
ROW_GROUP_POSITIONS = 65_536  # row-group size: the streaming reader's unit of memory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def temp_for(path: Path) -> Iterator[Path]:
    """A temp name next to ``path``, removed if the block fails (a full disk must not leave a torn file behind)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_parquet(table: pa.Table, where, options: dict | None) -> None:
    pq.write_table(
        table,
        where,
        compression="zstd",
        use_dictionary=["id"],
        row_group_size=ROW_GROUP_POSITIONS,
        write_statistics=["id", "position", "logz", "tail_mass"],
        **(options or {}),
    )


def write_shard(table: pa.Table, path: Path | ObjectPath, options: dict | None = None) -> dict:
    """Write one shard atomically (temp name, fsync, rename; on an object store one PUT) and return its journal
    entry. ``options``: further pyarrow write options (a target format's ``parquet_options``)."""
    if isinstance(path, ObjectPath):
        buffer = pa.BufferOutputStream()
        _write_parquet(table, buffer, options)
        data = buffer.getvalue().to_pybytes()
        path.write_bytes(data)
        return {
            "file": path.name,
            "rows": table.num_rows,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    with temp_for(path) as tmp:
        _write_parquet(table, tmp, options)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"file": path.name, "rows": table.num_rows, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_json_atomic(obj: dict, path: Path | ObjectPath) -> None:
    if isinstance(path, ObjectPath):  # one PUT: atomic on an object store
        path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        return
    with temp_for(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def try_lock(cache_dir: Path | ObjectPath, create: bool = True, shared: bool = False, name: str = LOCK):
    """A non-blocking flock on the cache's lock file, held until the returned handle closes (use it as a context
    manager); None when another process holds it in a conflicting mode.

    Exclusive (the default) for a single writer and for whoever removes or seals the cache; ``shared`` for one
    of several workers, which each also hold their own ``WORKER_LOCK`` exclusively. ``create=False`` (a dry run)
    leaves a directory without a lock file untouched: nobody can be holding it. Raises OSError when the lock
    file cannot be created. On an object store, an exclusive lock is a lease object (``_Lease``) and a shared
    one is not taken (a lease cannot be shared; each worker still holds its own ``WORKER_LOCK`` lease).
    """
    if isinstance(cache_dir, ObjectPath):
        return _Lease(None) if shared else _Lease.take(cache_dir / name, create)
    if not create and not (cache_dir / name).exists():
        return contextlib.nullcontext()
    handle = open(cache_dir / name, "a")
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


class _Lease:
    """The object-store stand-in for flock: a ``.lock`` object naming its holder, deleted when the block ends.

    Best effort, not a mutual exclusion: object stores offer no atomic create here, so two writers starting in
    the same instant can both win. It stops the common mistake (a second run of the same command while the
    first is going). A lease left by a killed process on this host is taken over; one from another host must
    be deleted by hand (the CLI message says so).
    """

    def __init__(self, path: ObjectPath | None):
        self.path = path

    @classmethod
    def take(cls, path: ObjectPath, create: bool) -> _Lease | None:
        if path.exists():
            try:
                holder = json.loads(path.read_text())
            except json.JSONDecodeError:
                holder = {}  # not a lease this code wrote: treat it as held
            if not _dead_here(holder):
                return None
        if not create:
            return cls(None)  # a dry run holds nothing
        token = uuid.uuid4().hex
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token}))
        if json.loads(path.read_text()).get("token") != token:  # another writer put its lease after ours
            return None
        return cls(path)

    def __enter__(self) -> _Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the lease (a file handle's close releases its flock the same way)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _dead_here(holder: dict) -> bool:
    """True when the lease's holder was a process on this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return False


def journal_path(cache_dir: Path | ObjectPath, worker: int = 0, workers: int = 1) -> Path | ObjectPath:
    """Where worker ``worker`` of ``workers`` journals its shards (a single process: ``progress.jsonl``)."""
    return cache_dir / (JOURNAL if workers == 1 else WORKER_JOURNAL.format(worker))


def append_journal(cache_dir: Path | ObjectPath, entry: dict, worker: int = 0, workers: int = 1) -> None:
    line = json.dumps(entry) + "\n"
    journal = journal_path(cache_dir, worker, workers)
    if isinstance(journal, ObjectPath):  # no append on object stores: rewrite it whole (one line per shard)
        journal.write_text((journal.read_text() if journal.exists() else "") + line)
        return
    with open(journal, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_journal(cache_dir: Path | ObjectPath, shards: Collection[int] | None = None) -> list[dict]:
    """Finished shards from earlier runs (of every worker), each re-checked against its file, in shard order.

    A torn last line (a process died mid-write) ends that journal; a shard whose file is missing or changed is
    left out, so it is recomputed and a resumed cache equals an uninterrupted one. ``shards``: check only these
    (a worker checks its own); None: all.
    """
    found: dict[int, dict] = {}
    paths = sorted(cache_dir.glob(WORKER_JOURNAL.replace("{:05d}", "*")))
    for path in [cache_dir / JOURNAL] + paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            shard = entry.get("shard")
            if not isinstance(shard, int) or shard in found or (shards is not None and shard not in shards):
                continue
            file = cache_dir / entry.get("file", "")
            if file.is_file() and sha256_file(file) == entry.get("sha256"):
                found[shard] = entry
    return [found[s] for s in sorted(found)]


def claim_json(obj: dict, path: Path | ObjectPath) -> dict:
    """Write ``obj`` to ``path`` unless it exists, atomically even against other writers; return what is there.

    Workers starting together race to create request.json: the first link wins and everyone reads the winner.
    On an object store (no link) the last PUT wins and everyone reads it after writing theirs, or finding one.
    """
    if isinstance(path, ObjectPath):
        if not path.exists():
            write_json_atomic(obj, path)
        return json.loads(path.read_text())
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
        _fsync_dir(path.parent)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return json.loads(path.read_text())
