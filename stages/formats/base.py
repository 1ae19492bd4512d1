"""What every target format provides (TargetFormat), and the array helpers the formats share."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from stages.errors import CacheError

DEFAULT_FORMAT = "topk"  # a manifest without target_format predates sampled caches: it holds top-k targets


class TargetFormat:
    """What every target format provides; see TopK and Sampled."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # the shard's target columns, in schema order
    null_columns: ClassVar[str]  # the DuckDB `positions` view's columns of this format, as NULLs of their types
    drawn: ClassVar[bool] = False  # targets are draws from the dense logits (need them whole), not a top-k
    parquet_options: ClassVar[dict] = {}  # pyarrow write options beyond write_shard's own
    # The manifest's format_version: a reader that predates a format's columns refuses it by this number.
    format_version: ClassVar[int] = 1

    def fields(self) -> list[pa.Field]:
        """The shard's target columns (between ``position`` and the hidden states)."""
        raise NotImplementedError

    def request(self, config: Any) -> dict:
        """The fields of a cache-teacher config that determine this format's content (part of the cache key)."""
        raise NotImplementedError

    def manifest_fields(self, config: Any) -> dict:
        """top_k, samples and sample_seed as the manifest records them."""
        raise NotImplementedError

    def manifest_problem(self, m: dict) -> str:
        """How the manifest's format fields contradict its request or themselves; '' if they do not."""
        raise NotImplementedError

    def size_problem(self, values: dict[str, int], rows: int, m: dict) -> tuple[str, dict[str, tuple[int, str]]]:
        """From a shard footer's value counts per column: (a fault, or ''), and list columns' sizes per position."""
        raise NotImplementedError

    def shard_columns(self, out: dict[str, np.ndarray], config: Any) -> dict[str, pa.Array]:
        """A shard's target columns from the runner's per-position arrays (dataset order)."""
        raise NotImplementedError

    def decode(self, table: pa.Table, m: dict, top_k: int) -> dict[str, np.ndarray]:
        """A shard's target columns -> the loader's per-row arrays (``top_k``: a prefix to keep, 0 = all)."""
        raise NotImplementedError

    def batch_targets(self, t: dict, m: dict) -> Any:
        """The loss's targets from the loader's batch tensors named as ``decode`` names them."""
        raise NotImplementedError

    def plain(self, table: pa.Table, m: dict) -> dict[str, pa.Array]:
        """A shard's target columns decoded into format 1's plain top-k columns (``caches export``)."""
        raise CacheError(
            f"a {self.name} cache holds no top-k log-probabilities, so it has no plain top-k form to export; "
            "export a top-k cache (cache-teacher --target-format topk)"
        )

    def loss(self, alpha: float, temperature: float) -> Any:
        """The KD loss this format feeds, or None to let the method choose (top-k targets feed several)."""
        raise NotImplementedError

    def sql_source(self, read: str) -> str:
        """The FROM clause of the `positions` view over ``read`` (read_parquet(...)); a subquery may add helpers."""
        return read

    def sql_columns(self) -> str:
        """This format's columns in the DuckDB `positions` view (decoded: `pipeline query` sees one schema)."""
        raise NotImplementedError

    def describe(self, m: dict) -> str:
        """A few words for `caches show` and reports: what each position holds."""
        raise NotImplementedError

    def statistics_sql(self, source: str, m: dict) -> tuple[str, dict[str, str], str]:
        """Per-position statistics over ``source`` (SQL of the cache's positions): (query, column -> reported
        name, how they are computed)."""
        raise NotImplementedError

    @property
    def has_tail(self) -> bool:
        """Whether caches of this format store the exact tail mass (the tail-mass report applies)."""
        return False

    @property
    def exact_logp(self) -> bool:
        """Whether it stores the teacher's exact log-probabilities of its ids (held-out KL, reliability need them)."""
        return False


def by_id(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[N, k] values reordered by ascending id per row, as float64: compares encodings whatever their id order."""
    return np.take_along_axis(values.astype(np.float64), np.argsort(ids, axis=1, kind="stable"), 1)


def flat(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False)


def padded(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A ragged list column -> [rows, width], each row's values left-aligned, zeros after."""
    column = column.combine_chunks()
    lengths = np.diff(column.offsets.to_numpy())
    out = np.zeros((len(column), width), dtype=column.type.value_type.to_pandas_dtype())
    out[np.arange(width)[None, :] < lengths[:, None]] = column.flatten().to_numpy()
    return out


def ragged_list(values: np.ndarray, keep: np.ndarray) -> pa.ListArray:
    """[rows, width] values -> one list per row of the entries where ``keep`` is True (row-major order)."""
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep]))


def fixed_list(values: np.ndarray, width: int) -> pa.ListArray:
    offsets = pa.array(np.arange(0, values.shape[0] * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1)))
