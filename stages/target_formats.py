"""Target formats: one class per way a cache stores the teacher's soft targets.

Each format owns its shard columns, what it adds to a cache's request (its key) and manifest, the checks of its
manifest fields and list sizes, how shard rows decode into arrays, the batch targets and loss they feed, its
DuckDB columns and statistics, and the words reports use for it. Callers ask the format object instead of
comparing ``target_format`` strings, so a new format is one new class registered in ``FORMATS``.

Torch stays out of this module's imports (the catalog commands read formats without loading it); the two
methods that build tensors import the losses when called.
"""

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

    def loss(self, alpha: float, temperature: float) -> Any:
        """The KD loss this format feeds, or None to let the method choose (top-k targets feed several)."""
        raise NotImplementedError

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


class TopK(TargetFormat):
    """The k most likely ids with their exact log-probabilities under the full softmax, logZ and the tail mass."""

    name = "topk"
    columns = ("topk_ids", "topk_logp", "logz", "tail_mass")
    null_columns = (
        "NULL::INTEGER[] AS topk_ids, NULL::FLOAT[] AS topk_logp, NULL::FLOAT AS logz, NULL::FLOAT AS tail_mass"
    )

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logp", pa.list_(pa.float32()), nullable=False),
            pa.field("logz", pa.float32(), nullable=False),
            pa.field("tail_mass", pa.float32(), nullable=False),
        ]

    def request(self, config: Any) -> dict:
        return {"top_k": config.top_k}

    def manifest_fields(self, config: Any) -> dict:
        return {"top_k": config.top_k, "samples": 0, "sample_seed": None}

    def manifest_problem(self, m: dict) -> str:
        top_k, num_classes = m["top_k"], m["teacher"].get("num_classes")
        if "top_k" in m["request"] and m["request"]["top_k"] != top_k:
            return f"says top_k {top_k!r}, but the request the cache was built for (its key) says {m['request']['top_k']!r}"
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0):
            return f"has a malformed top_k {top_k!r}"
        if isinstance(num_classes, int) and top_k > num_classes:
            return f"says top_k {top_k} of only {num_classes} classes"
        return ""

    def size_problem(self, values: dict[str, int], rows: int, m: dict) -> tuple[str, dict[str, tuple[int, str]]]:
        k = int(m["top_k"])
        return "", {c: (k, f"top_k {k}") for c in self.columns[:2]}

    def shard_columns(self, out: dict[str, np.ndarray], config: Any) -> dict[str, pa.Array]:
        return {
            "topk_ids": fixed_list(out["ids"], config.top_k),
            "topk_logp": fixed_list(out["logp"], config.top_k),
            "logz": pa.array(out["logz"]),
            "tail_mass": pa.array(out["tail"]),
        }

    def decode(self, table: pa.Table, m: dict, top_k: int) -> dict[str, np.ndarray]:
        k = int(m["top_k"])
        keep = top_k or k
        return {
            "ids": flat(table.column("topk_ids")).reshape(-1, k)[:, :keep].astype(np.int64),
            "logp": np.ascontiguousarray(flat(table.column("topk_logp")).reshape(-1, k)[:, :keep]),
            "logz": table.column("logz").to_numpy(),
        }

    def batch_targets(self, t: dict, m: dict) -> Any:
        from stages.losses import SoftTargets  # torch: loaded only by the trainer's loader

        return SoftTargets(t["ids"], t["logp"], t["logz"], float(m["temperature"]), int(m["teacher"]["num_classes"]))

    def loss(self, alpha: float, temperature: float) -> Any:
        return None

    def sql_columns(self) -> str:
        return ", ".join(self.columns)

    def describe(self, m: dict) -> str:
        return f"top-{m['top_k']}"

    def statistics_sql(self, source: str, m: dict) -> tuple[str, dict[str, str], str]:
        """tail_mass and top1_prob (= exp(topk_logp[1])) are exact. The teacher's entropy at T is not stored, so it
        is bracketed from the top-k and the tail: the cached ids contribute -sum p log p exactly; the tail mass m
        over the V-k uncached ids contributes at least -m log p_k (no uncached id is likelier than the k-th) and
        at most -m log(m / (V-k)) (spread uniformly). With k = V both bounds are the exact entropy.
        """
        uncached = max(int(m["teacher"]["num_classes"] or 0) - int(m["top_k"]), 0)
        query = f"""
            SELECT tail, top1,
                   h_top + CASE WHEN tail > 0 AND logp_min > -1e30 THEN -tail * logp_min ELSE 0 END AS entropy_lower,
                   h_top + CASE WHEN tail > 0 AND {uncached} > 0 THEN -tail * ln(tail / {uncached}) ELSE 0 END AS entropy_upper
            FROM (SELECT greatest(tail_mass::DOUBLE, 0) AS tail, exp(topk_logp[1]::DOUBLE) AS top1, topk_logp[-1]::DOUBLE AS logp_min,
                         list_sum([CASE WHEN x > -1e30 THEN -exp(x) * x ELSE 0 END FOR x IN topk_logp::DOUBLE[]]) AS h_top
                  FROM ({source}))"""
        names = {"tail": "tail_mass", "top1": "top1_prob", "entropy_lower": "entropy_lower"}
        return query, names | {"entropy_upper": "entropy_upper"}, "entropy bracketed from the top-k and the tail"

    @property
    def has_tail(self) -> bool:
        return True

    @property
    def exact_logp(self) -> bool:
        return True


class Sampled(TargetFormat):
    """Distinct ids drawn from softmax(logits / T), ascending, with how often each was drawn."""

    name = "sampled"
    drawn = True
    columns = ("sample_ids", "sample_counts")
    null_columns = "NULL::INTEGER[] AS sample_ids, NULL::SMALLINT[] AS sample_counts"

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("sample_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("sample_counts", pa.list_(pa.int16()), nullable=False),
        ]

    def request(self, config: Any) -> dict:
        return {"samples": config.samples, "sample_seed": config.sample_seed}

    def manifest_fields(self, config: Any) -> dict:
        return {"top_k": 0, "samples": config.samples, "sample_seed": config.sample_seed}

    def manifest_problem(self, m: dict) -> str:
        for field in ("samples", "sample_seed"):
            if field in m["request"] and m["request"][field] != m.get(field):
                return (
                    f"says {field} {m.get(field)!r}, but the request the cache was built for (its key) says "
                    f"{m['request'][field]!r}"
                )
        return ""

    def size_problem(self, values: dict[str, int], rows: int, m: dict) -> tuple[str, dict[str, tuple[int, str]]]:
        samples = int(m.get("samples", 0))
        if values["sample_ids"] != values["sample_counts"] or values["sample_ids"] > rows * samples:
            return f"holds {values['sample_ids']} drawn ids for {rows} positions of {samples} draws", {}
        return "", {}

    def shard_columns(self, out: dict[str, np.ndarray], config: Any) -> dict[str, pa.Array]:
        drawn = out["sample_counts"] > 0  # padding slots past each row's distinct ids are dropped
        return {
            "sample_ids": ragged_list(out["sample_ids"], drawn),
            "sample_counts": ragged_list(out["sample_counts"], drawn),
        }

    def decode(self, table: pa.Table, m: dict, top_k: int) -> dict[str, np.ndarray]:
        samples = int(m["samples"])
        # Ragged distinct ids -> [rows, samples] padded with weight 0.
        ids, counts = padded(table.column("sample_ids"), samples), padded(table.column("sample_counts"), samples)
        return {"ids": ids.astype(np.int64), "weights": counts.astype(np.float32) / samples}

    def batch_targets(self, t: dict, m: dict) -> Any:
        from stages.losses import SampledTargets  # torch: loaded only by the trainer's loader

        return SampledTargets(t["ids"], t["weights"], float(m["temperature"]), int(m["teacher"]["num_classes"]))

    def loss(self, alpha: float, temperature: float) -> Any:
        from stages.losses import SampledKDLoss  # torch: loaded only by the trainer

        return SampledKDLoss(alpha, temperature)

    def sql_columns(self) -> str:
        return ", ".join(self.columns)

    def describe(self, m: dict) -> str:
        return f"{m['samples']} draws"

    def statistics_sql(self, source: str, m: dict) -> tuple[str, dict[str, str], str]:
        """How many distinct ids the draws hit per position, and the top draw's frequency."""
        query = f"""
            SELECT len(sample_ids)::DOUBLE AS distinct_ids, list_max(sample_counts)::DOUBLE / {int(m["samples"])} AS top_frequency
            FROM ({source})"""
        return (
            query,
            {"distinct_ids": "distinct_ids", "top_frequency": "top_draw_frequency"},
            "the draws of each position",
        )


FORMATS: dict[str, TargetFormat] = {f.name: f for f in (TopK(), Sampled())}


def get_format(name: str) -> TargetFormat:
    """The format called ``name`` (config.problems() has already refused unknown names from users)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise CacheError(f"unknown target format {name!r}; this pipeline reads {sorted(FORMATS)}") from None


def format_of(manifest: dict) -> TargetFormat:
    """A cache's format, from its manifest."""
    return get_format(manifest.get("target_format", DEFAULT_FORMAT))


def view_columns(of: TargetFormat | None) -> str:
    """The `positions` view's target columns for one cache: its format's own, every other format's as NULLs
    (``of`` None: all NULLs, for the view over no caches)."""
    return ", ".join(
        f.sql_columns() if of is not None and f.name == of.name else f.null_columns for f in FORMATS.values()
    )


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
