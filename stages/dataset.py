"""The input dataset: one Parquet file or a directory of them, read by row ranges without loading it whole.

Contract (README, "Dataset format"): a unique ``id`` column (integer or string); one column per model input,
named like the input, holding lists (nested lists for 2-D inputs); an optional integer label column, ``label`` or
``labels`` (the Hugging Face name), null for unlabelled rows of a transfer set. Row order is the order of the
sorted file names, then the file's own order, and it is part of the dataset's identity: caches are written and
read back in that order. The identity (``Dataset.fingerprint``) is the rows themselves, not the files holding them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import storage
from stages.errors import DatasetError
from stages.storage import ObjectPath

ID_COLUMN = "id"
FINGERPRINT_OF = "rows"  # what manifests say the fingerprint covers; older ones, without it, hashed the files
LABEL_COLUMNS = ("label", "labels")  # "labels" is the Hugging Face name; a dataset may have one of them
LOSS_MASK_COLUMN = "loss_mask"  # optional, token data: 1 where the token is a training target (chat: the assistant)
TOKENIZER_SHA256_KEY = b"kd.tokenizer_sha256"  # Parquet metadata written by prepare-data
_HASH_CHUNK = 1 << 20  # bytes read at a time while hashing a file


@dataclass(frozen=True)
class _RowGroup:
    file_index: int
    group_index: int
    start: int  # global index of the group's first row
    num_rows: int


class Dataset:
    """Random access by global row range over a set of Parquet files, one row group at a time."""

    def __init__(self, path: str | Path | ObjectPath):
        self.path = storage.location(path)  # a local path, or an object-store URI (s3://bucket/prefix)
        if not self.path.exists():
            raise DatasetError(f"dataset not found: {self.path}. Pass a Parquet file or a directory of them.")
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*.parquet") if p.is_file())
            if not self.files:
                raise DatasetError(f"no *.parquet files under {self.path}")
        else:
            self.files = [self.path]
        self._parquet: list[pq.ParquetFile] = []
        for f in self.files:
            try:
                self._parquet.append(pq.ParquetFile(storage.open_input(f)))
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"{f} is not a readable Parquet file: {exc}") from exc
        self.schema = self._parquet[0].schema_arrow
        for f, pf in zip(self.files[1:], self._parquet[1:]):
            if not pf.schema_arrow.equals(self.schema):
                raise DatasetError(
                    f"{f} has a different schema from {self.files[0]}; "
                    "every file of a dataset needs the same columns and types"
                )
        if ID_COLUMN not in self.schema.names:
            raise DatasetError(f"dataset {self.path} has no '{ID_COLUMN}' column; every row needs a unique id")
        id_type = self.schema.field(ID_COLUMN).type
        if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise DatasetError(f"column '{ID_COLUMN}' has type {id_type}; use an integer or string id")
        self.label_column = self._find_label_column()  # every reader of labels goes through this name
        self._groups: list[_RowGroup] = []
        start = 0
        for fi, pf in enumerate(self._parquet):
            for gi in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(gi).num_rows
                self._groups.append(_RowGroup(fi, gi, start, n))
                start += n
        self.num_rows = start
        if not self.num_rows:  # nothing to cache, train on or evaluate: every stage would fail further in
            raise DatasetError(f"dataset {self.path} has no rows; give a dataset with at least one row")
        self._starts = [g.start for g in self._groups]
        self._fingerprint: str | None = None
        self._last_group: tuple | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None

    def _find_label_column(self) -> str | None:
        present = [c for c in LABEL_COLUMNS if c in self.schema.names]
        if len(present) > 1:
            raise DatasetError(
                f"dataset {self.path} has both {' and '.join(repr(c) for c in present)} columns; "
                "keep one of them as the label column (one integer class per row)"
            )
        if not present:
            return None
        name, label_type = present[0], self.schema.field(present[0]).type
        if not (pa.types.is_integer(label_type) or pa.types.is_null(label_type)):
            raise DatasetError(
                f"label column '{name}' of dataset {self.path} holds {label_type}; it must hold one integer class "
                "per row (null: unlabelled). Cast it to integers, or drop it (token-level targets come from input_ids)"
            )
        return name

    @property
    def tokenizer_sha256(self) -> str | None:
        """The sha256 of the tokenizer prepare-data used, or None for data made another way."""
        value = (self.schema.metadata or {}).get(TOKENIZER_SHA256_KEY)
        return value.decode() if value else None

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) in dataset order, reading only the row groups that overlap them."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return self.schema.empty_table().select(columns or self.columns)
        first = bisect.bisect_right(self._starts, start) - 1
        pieces = []
        for g in self._groups[first:]:
            if g.start >= stop:
                break
            table = self._read_group(g, columns)
            lo = max(start - g.start, 0)
            hi = min(stop - g.start, g.num_rows)
            pieces.append(table.slice(lo, hi - lo))
        return pa.concat_tables(pieces)

    def _read_group(self, g: _RowGroup, columns: list[str] | None) -> pa.Table:
        """One row group, remembering the last: consecutive reads of a large group decode it once."""
        key = (g.file_index, g.group_index, tuple(columns) if columns else None)
        if self._last_group is None or self._last_group[0] != key:
            self._last_group = (key, self._parquet[g.file_index].read_row_group(g.group_index, columns=columns))
        return self._last_group[1]

    def ids(self) -> pa.Array:
        """The whole id column (read alone: cheap even for large datasets)."""
        return pa.concat_arrays(
            [c for pf in self._parquet for c in pf.read(columns=[ID_COLUMN]).column(ID_COLUMN).chunks]
        )

    def labels(self) -> pa.ChunkedArray:
        """The whole label column as int64, nulls kept (read alone). Only for a dataset that ``has_labels``."""
        return pa.chunked_array(
            [pf.read(columns=[self.label_column]).column(0).cast(pa.int64()) for pf in self._parquet], pa.int64()
        )

    def check_unique_ids(self) -> None:
        ids = self.ids()
        if ids.null_count:
            raise DatasetError(f"column '{ID_COLUMN}' has {ids.null_count} null values; every row needs an id")
        counts = pc.value_counts(ids)
        dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(dup):
            shown = ", ".join(str(v) for v in dup.to_pylist()[:5])
            raise DatasetError(
                f"column '{ID_COLUMN}' has {len(dup)} duplicated value(s), e.g. {shown}; ids must be unique"
            )

    def fingerprint(self) -> str:
        """The dataset's identity: a sha256 of its rows (values and order) and its columns (names and types).

        It does not depend on file names, paths, how the rows are split into files, row groups or batches,
        compression, Parquet encodings, the order of the columns, or schema metadata, so a copy or a rewrite of
        the same rows keeps its caches. Computed once per Dataset, one row group in memory at a time (as ``read``).
        """
        if self._fingerprint is None:
            streams: dict[tuple, hashlib._Hash] = {}
            for pf in self._parquet:
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group)
                    for name, column in zip(table.column_names, table.columns):
                        for chunk in column.chunks:
                            _hash_values(streams, (name,), chunk)
            columns = sorted((f.name, _type_name(f.type)) for f in self.schema)
            h = hashlib.sha256(json.dumps(columns).encode())
            for key in sorted(streams):
                h.update(json.dumps(key).encode() + streams[key].digest())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def file_fingerprint(self) -> str:
        """sha256 over the files' names (relative to the dataset root) and bytes: the identity that caches written
        before ``FINGERPRINT_OF`` record, so they still pair with their dataset."""
        h = hashlib.sha256()
        root = self.path if self.path.is_dir() else self.path.parent
        for f in self.files:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(sha256_file(f).encode())
        return h.hexdigest()


def _type_name(t: pa.DataType) -> str:
    """A type's name with the distinctions that are storage, not content, removed: large vs small offsets,
    dictionary encoding, and the name Parquet writers give a list's item field."""
    if pa.types.is_dictionary(t):
        return _type_name(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_fixed_size_list(t):
        return f"list<{_type_name(t.value_type)}>[{t.list_size}]"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_type_name(f.type)}" for f in t) + ">"
    if pa.types.is_large_string(t):
        return "string"
    if pa.types.is_large_binary(t):
        return "binary"
    return str(t)


def _hash_values(streams: dict[tuple, hashlib._Hash], key: tuple, array: pa.Array) -> None:
    """Feed one column's values into hash streams keyed by their part of the column.

    Each stream holds one part (validity, list lengths, string bytes, fixed-width values) of every row in
    order, so it is the same however the rows were cut into batches. Values under a null are not hashed (their
    bytes are unspecified); the validity stream records where the nulls are.
    """

    def feed(part: str, data) -> None:
        streams.setdefault(key + (part,), hashlib.sha256()).update(data)

    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    feed("valid", array.is_valid().to_numpy(zero_copy_only=False))
    if array.null_count:
        array = array.drop_null()
    t = array.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        feed("length", pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64))
        _hash_values(streams, key + ("[]",), array.flatten())
    elif pa.types.is_fixed_size_list(t):
        _hash_values(streams, key + ("[]",), array.flatten())
    elif pa.types.is_struct(t):
        for field, child in zip(t, array.flatten()):
            _hash_values(streams, key + ("." + field.name,), child)  # "." keeps field names apart from parts
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        array = array.cast(pa.large_binary())
        _, offsets, data = array.buffers()
        offsets = np.frombuffer(offsets, np.int64)[array.offset : array.offset + len(array) + 1]
        feed("length", np.diff(offsets))
        feed("bytes", memoryview(data)[offsets[0] : offsets[-1]] if data is not None else b"")
    elif pa.types.is_boolean(t):
        feed("values", array.to_numpy(zero_copy_only=False))
    elif pa.types.is_primitive(t) or pa.types.is_decimal(t) or pa.types.is_fixed_size_binary(t):
        width = t.bit_width // 8
        feed("values", memoryview(array.buffers()[1])[array.offset * width : (array.offset + len(array)) * width])
    elif not pa.types.is_null(t):
        raise DatasetError(
            f"column '{key[0]}' holds {t}, which the dataset fingerprint cannot hash; "
            "drop the column or store it as lists, structs, strings or numbers"
        )


def sha256_file(path: Path | ObjectPath) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def column_to_array(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray | list[np.ndarray]:
    """A list column as one dense array [rows, ...] when every row has the same shape, else a list of arrays.

    Raises DatasetError for nulls or ragged nesting below the first level.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise DatasetError(f"column '{name}' has {column.null_count} null rows; inputs must be present in every row")
    depth = _depth(column.type)
    if not depth:
        return column.to_numpy(zero_copy_only=False)
    values = column
    for _ in range(depth):
        values = values.flatten()
    if values.null_count:
        raise DatasetError(
            f"column '{name}' has {values.null_count} null value(s) inside its rows; inputs must be complete "
            "(fill or drop those rows)"
        )
    rows = column.to_pylist() if depth > 1 else None
    if rows is not None:
        try:
            arrays = [np.asarray(r) for r in rows]
        except ValueError as exc:
            raise DatasetError(f"column '{name}' holds ragged nested lists: {exc}") from exc
        # Same shape in every row (an image, a [C, L] signal): one dense array, not sequences to pad.
        return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays
    offsets = column.offsets.to_numpy() if not pa.types.is_fixed_size_list(column.type) else None
    values = column.flatten().to_numpy(zero_copy_only=False)
    if offsets is None:
        return values.reshape(len(column), -1)
    lengths = np.diff(offsets)
    if len(lengths) and (lengths == lengths[0]).all():
        return values.reshape(len(column), int(lengths[0]))
    return [values[offsets[i] - offsets[0] : offsets[i + 1] - offsets[0]] for i in range(len(column))]


def _depth(t: pa.DataType) -> int:
    d = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        d += 1
        t = t.value_type
    return d


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop: the rows of ragged examples."""
    lengths = np.asarray(lengths)
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(np.asarray(starts) - before, lengths) + np.arange(int(lengths.sum()))
