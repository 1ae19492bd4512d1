"""The input dataset: one Parquet file or a directory of them, read by row ranges without loading it whole.

Contract (README, "Dataset format"): a unique ``id`` column (integer or string); one column per model input,
named like the input, holding lists (nested lists for 2-D inputs); an optional ``label`` column (null for
unlabelled rows of a transfer set). Row order is the order of the sorted file names, then the file's own order,
and it is part of the dataset's identity: caches are written and read back in that order.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.errors import DatasetError

ID_COLUMN = "id"
LABEL_COLUMN = "label"
_HASH_CHUNK = 1 << 20  # bytes read at a time while fingerprinting


@dataclass(frozen=True)
class _RowGroup:
    file_index: int
    group_index: int
    start: int  # global index of the group's first row
    num_rows: int


class Dataset:
    """Random access by global row range over a set of Parquet files, one row group at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
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
                self._parquet.append(pq.ParquetFile(f))
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"{f} is not a readable Parquet file: {exc}") from exc
        self.schema = self._parquet[0].schema_arrow
        for f, pf in zip(self.files[1:], self._parquet[1:]):
            if not pf.schema_arrow.equals(self.schema):
                raise DatasetError(
                    f"{f} has a different schema from {self.files[0]}; every file of a dataset needs the same columns and types"
                )
        if ID_COLUMN not in self.schema.names:
            raise DatasetError(f"dataset {self.path} has no '{ID_COLUMN}' column; every row needs a unique id")
        id_type = self.schema.field(ID_COLUMN).type
        if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise DatasetError(f"column '{ID_COLUMN}' has type {id_type}; use an integer or string id")
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
        return LABEL_COLUMN in self.schema.names

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
        """sha256 over the files' names (relative to the dataset root) and bytes: the dataset's identity.

        Computed once per Dataset: hashing a large dataset is the slow part of opening it.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        root = self.path if self.path.is_dir() else self.path.parent
        for f in self.files:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(sha256_file(f).encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
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
    if not (
        pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)
    ):
        return column.to_numpy(zero_copy_only=False)
    rows = column.to_pylist() if _depth(column.type) > 1 else None
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
