"""Where files live: a local path, or an object-store URI (``s3://bucket/prefix``, or any pyarrow.fs / fsspec URI).

``location(ref)`` returns a ``pathlib.Path`` for a local path, so local code paths stay exactly as they were
(temp file, fsync, rename), and an ``ObjectPath`` for a URI. ``ObjectPath`` offers the part of the Path API the
stages use (``/``, ``name``, ``exists``, ``iterdir``, ``glob``, ``read_bytes``, ``write_bytes``, ``unlink`` ...)
on top of a ``pyarrow.fs.FileSystem``, so most callers need not know which one they hold.

Object stores have no rename and no directories. ``write_bytes`` is one PUT: the object appears whole or not at
all, which is what a local temp file plus rename gives. A "directory" exists when some object lies under it.

S3 reads its endpoint and credentials from the standard variables (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_REGION`` ...).
Every object-store failure becomes a ``StorageError`` naming the URI and what to check.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from stages.errors import StorageError

_CREDENTIALS_HINT = (
    "check the bucket exists and the endpoint and credentials in AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
)

_BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs")  # the first path part is a bucket that must exist


def location(ref: str | os.PathLike) -> Path | ObjectPath:
    """A local ``Path`` for a path or ``file://`` URI; an ``ObjectPath`` for any other URI."""
    if isinstance(ref, (Path, ObjectPath)):
        return ref
    ref = str(ref)
    if "://" not in ref:
        return Path(ref)
    parts = urlsplit(ref)
    if parts.scheme == "file":
        return Path(parts.path)
    if not parts.netloc:
        raise StorageError(f"'{ref}' names no bucket; write {parts.scheme}://BUCKET/PREFIX")
    return ObjectPath(_filesystem(parts.scheme, parts.netloc), f"{parts.netloc}{parts.path}".rstrip("/"), parts.scheme)


def display(ref: str | os.PathLike) -> str:
    """How a dataset or run path is recorded: an absolute local path, or the URI as given."""
    where = location(ref)
    return str(where.resolve()) if isinstance(where, Path) else str(where)


@cache
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One filesystem per scheme and bucket for the process (pyarrow's S3 client is costly to build)."""
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not endpoint and not region:  # AWS serves a bucket from its own region only: ask (as from_uri does)
            try:
                region = pafs.resolve_s3_region(bucket)
            except OSError as exc:
                raise StorageError(f"cannot find the region of bucket '{bucket}': {exc}; {_CREDENTIALS_HINT}") from exc
        # allow_delayed_open: a small object is one PutObject rather than a multipart upload of one part.
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region, allow_delayed_open=True)
    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        pass  # a scheme pyarrow has no native filesystem for: try fsspec's registry
    import fsspec  # imported here: only URIs outside pyarrow's own schemes need it

    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"no filesystem for '{scheme}://' URIs ({exc}); use s3://, a local path, or install the fsspec "
            f"package for {scheme}://"
        ) from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime: float


class ObjectPath:
    """A file or "directory" on an object store, with the part of the pathlib API the stages use."""

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str):
        self.fs, self.path, self.scheme = fs, path, scheme

    # -- naming -------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.fs, f"{self.path}/{name}", self.scheme)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.fs, str(PurePosixPath(self.path).parent), self.scheme)

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        return PurePosixPath(self.path).relative_to(other.path)

    def resolve(self) -> ObjectPath:
        return self

    # -- queries ------------------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageError(f"cannot {action} {self}: {first}; {_CREDENTIALS_HINT}") from exc

    def _info(self) -> pafs.FileInfo:
        with self._guard("look up"):
            return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        """Size and modification time; a "directory" has no times of its own, so it takes its newest object's."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            times = [i.mtime.timestamp() for i in self._listing(recursive=True) if i.mtime is not None]
            return _Stat(0, max(times, default=0.0))
        return _Stat(info.size or 0, info.mtime.timestamp() if info.mtime is not None else 0.0)

    def _listing(self, recursive: bool) -> list[pafs.FileInfo]:
        with self._guard("list"):
            return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive))

    def iterdir(self) -> Iterator[ObjectPath]:
        for info in sorted(self._listing(recursive=False), key=lambda i: i.path):
            yield ObjectPath(self.fs, info.path, self.scheme)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Direct children whose name matches ``pattern`` (no ``**``: the stages never need it)."""
        return (p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern))

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        for info in sorted(self._listing(recursive=True), key=lambda i: i.path):
            if fnmatch.fnmatch(info.base_name, pattern):
                yield ObjectPath(self.fs, info.path, self.scheme)

    def walk(self) -> Iterator[tuple[ObjectPath, list[str], list[str]]]:
        """Like os.walk, top-down from one recursive listing; clearing ``dirnames`` prunes as os.walk does."""
        children: dict[str, tuple[list[str], list[str]]] = {}
        for info in self._listing(recursive=True):
            parent, name = info.path.rsplit("/", 1)
            slot = children.setdefault(parent, ([], []))
            (slot[0] if info.type == pafs.FileType.Directory else slot[1]).append(name)
        pending = [self.path]
        while pending:
            here = pending.pop(0)
            dirnames, filenames = (sorted(x) for x in children.get(here, ([], [])))
            yield ObjectPath(self.fs, here, self.scheme), dirnames, filenames
            pending[:0] = [f"{here}/{d}" for d in dirnames]

    # -- reading and writing ------------------------------------------------------------------------------
    def open_input(self) -> pa.NativeFile:
        """A random-access file for pyarrow (Parquet reads only the footer and the column chunks it needs)."""
        with self._guard("read"):
            return self.fs.open_input_file(self.path)

    def open(self, mode: str = "rb") -> pa.NativeFile:
        if mode != "rb":
            raise ValueError(f"ObjectPath.open supports 'rb' only, not {mode!r}: write whole objects")
        return self.open_input()

    def read_bytes(self) -> bytes:
        with self.open_input() as fh, self._guard("read"):
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: readers see the whole object or none (the object store's atomic write)."""
        with self._guard("write"):
            with self.fs.open_output_stream(self.path) as fh:
                fh.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        with self._guard("delete"):
            self.fs.delete_file(self.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: check the bucket exists, so a typo fails here, not mid-run.
        Other filesystems (fsspec's) get the directory created."""
        if self.scheme not in _BUCKET_SCHEMES:
            with self._guard("create"):
                self.fs.create_dir(self.path, recursive=True)
            return
        self.check_bucket()

    def check_bucket(self) -> None:
        """Raise StorageError if the bucket does not exist (a listing under it would just come back empty)."""
        if self.scheme not in _BUCKET_SCHEMES:
            return
        bucket = self.path.split("/", 1)[0]
        with self._guard("look up the bucket of"):
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        if not found:
            raise StorageError(f"bucket '{bucket}' of {self} does not exist; create it or fix the URI")

    def rmtree(self) -> None:
        with self._guard("delete"):
            self.fs.delete_dir(self.path)


def open_input(path: Path | ObjectPath) -> str | pa.NativeFile:
    """What pyarrow readers take for ``path``: the local path itself, or an open random-access object."""
    return path.open_input() if isinstance(path, ObjectPath) else str(path)


def walk(root: Path | ObjectPath) -> Iterator[tuple[Path | ObjectPath, list[str], list[str]]]:
    """os.walk for either kind of location, yielding the directory as the same kind of location."""
    if isinstance(root, ObjectPath):
        yield from root.walk()
        return
    for dirpath, dirnames, filenames in os.walk(root):
        yield Path(dirpath), dirnames, filenames


def tree_bytes(path: Path | ObjectPath) -> int:
    """Bytes of every file under ``path``; an object store answers from one listing, not a request per object."""
    if isinstance(path, ObjectPath):
        return sum(i.size or 0 for i in path._listing(recursive=True) if i.type == pafs.FileType.File)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rmtree(path: Path | ObjectPath) -> None:
    if isinstance(path, ObjectPath):
        path.rmtree()
    else:
        shutil.rmtree(path)


def upload_tree(local: Path, target: ObjectPath, last: str, skip: tuple[str, ...] = ()) -> None:
    """Copy a finished local directory to the object store, the file named ``last`` after every other one.

    ``last`` is the file whose presence says the whole is complete (a run's metrics.json), so a reader that
    sees it sees everything. Files named in ``skip`` (a lock file) stay behind.
    """
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in skip)
    for f in sorted(files, key=lambda p: p.name == last):  # False sorts first: ``last`` goes last
        (target / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())
