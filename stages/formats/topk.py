"""Top-k targets: the k most likely ids, their log-probabilities, logZ and the exact tail, in one of three
encodings (fp32, fp16, int8), one class each."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from stages.errors import CacheError
from stages.formats.base import TargetFormat, fixed_list, flat, padded, ragged_list

# A top-p cache's lists hold min_k..top_k values per position: readers that assume exactly top_k (versions 1 and
# 2) would misread them, so they refuse it by this version.
RAGGED_VERSION = 3


class TopK(TargetFormat):
    """The k most likely ids with their log-probabilities under the full softmax, logZ and the exact tail mass.

    Ids and log-probabilities are stored in an encoding, one subclass each: fp32 here (exact, format 1's
    columns), TopKFp16 and TopKInt8. An encoding owns ``pack`` (ids, log-probs -> its columns), ``unpack`` (its
    columns -> ids, log-probs), the SQL that decodes them and its Parquet writer options; every reader gets
    ``topk_ids`` and ``topk_logp`` back, ids by descending probability.

    ``ragged`` (a top-p cache): each position keeps the smallest prefix of its top-k whose probability reaches
    top_p, at least min_k ids; its list columns hold that many values. Decoded, each position is padded to top_k
    with a validity mask (padded slots: id 0, log-prob -inf), which the losses take as ``SoftTargets.valid``.
    """

    name = "topk"
    encoding: ClassVar[str] = "fp32"
    # The encoded id and log-prob columns: (name, Arrow type); list columns hold k values per position.
    encoded_fields: ClassVar[tuple[tuple[str, pa.DataType], ...]] = (
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logp", pa.list_(pa.float32())),
    )
    null_columns = (
        "NULL::INTEGER[] AS topk_ids, NULL::FLOAT[] AS topk_logp, NULL::FLOAT AS logz, NULL::FLOAT AS tail_mass"
    )
    fixed_version: ClassVar[int] = 1  # the format_version of this encoding's fixed-k caches

    def __init__(self, ragged: bool = False) -> None:
        self.ragged = ragged  # top-p: min_k..top_k ids per position; False: exactly top_k

    @property
    def format_version(self) -> int:
        return RAGGED_VERSION if self.ragged else self.fixed_version

    @property
    def columns(self) -> tuple[str, ...]:
        return (*(n for n, _ in self.encoded_fields), "logz", "tail_mass")

    def fields(self) -> list[pa.Field]:
        return [
            *(pa.field(n, t, nullable=False) for n, t in self.encoded_fields),
            pa.field("logz", pa.float32(), nullable=False),
            pa.field("tail_mass", pa.float32(), nullable=False),
        ]

    def pack(self, ids: np.ndarray, logp: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """[N, k] int32 ids and float32 log-probs (descending) -> the encoded columns' arrays ([N, k] or [N]).

        ``valid`` [N, k] bool: each row's kept prefix (top-p), None for all; in the [N, k] arrays each row's kept
        values come first, so the lists to write are their first ``valid.sum(1)`` values.
        """
        return {"topk_ids": ids.astype(np.int32, copy=False), "topk_logp": logp.astype(np.float32, copy=False)}

    def unpack(
        self, packed: dict[str, np.ndarray], tail: np.ndarray, valid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The encoded columns' arrays and the exact tail mass [N] -> [N, k] ids and float32 log-probs, by
        descending (decoded) probability. ``valid``: each row's kept prefix of the arrays (as ``pack`` wrote it;
        the rest holds anything); it stays each row's prefix in the output, whose other slots are id 0, -inf."""
        if valid is None:
            return packed["topk_ids"], packed["topk_logp"]
        return np.where(valid, packed["topk_ids"], 0), np.where(valid, packed["topk_logp"], -np.inf).astype(np.float32)

    def ids_sql(self) -> str:
        """A DuckDB expression giving topk_ids as INTEGER[] by descending probability."""
        return "topk_ids"

    def logp_sql(self) -> str:
        """A DuckDB expression over the encoded columns (and tail_mass) giving topk_logp as FLOAT[]."""
        return "topk_logp"

    def request(self, config: Any) -> dict:
        # fp32 and fixed k add nothing: the keys of caches written before encodings and top-p existed stay the same.
        return (
            {"top_k": config.top_k}
            | ({} if self.encoding == "fp32" else {"encoding": self.encoding})
            | self._top_p_fields(config)
        )

    def manifest_fields(self, config: Any) -> dict:
        fields = {"top_k": config.top_k, "samples": 0, "sample_seed": None, "encoding": self.encoding}
        return fields | self._top_p_fields(config)

    def _top_p_fields(self, config: Any) -> dict:
        return {"top_p": float(config.top_p), "min_k": config.min_k} if self.ragged else {}

    def manifest_problem(self, m: dict) -> str:
        top_k, num_classes, request = m["top_k"], m["teacher"].get("num_classes"), m["request"]
        if "top_k" in request and request["top_k"] != top_k:
            return f"says top_k {top_k!r}, but the request the cache was built for (its key) says {request['top_k']!r}"
        if request.get("encoding", "fp32") != self.encoding:
            return (
                f"says encoding {self.encoding!r}, but the request the cache was built for (its key) says "
                f"{request.get('encoding', 'fp32')!r}"
            )
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0):
            return f"has a malformed top_k {top_k!r}"
        if isinstance(num_classes, int) and top_k > num_classes:
            return f"says top_k {top_k} of only {num_classes} classes"
        for field in ("top_p", "min_k"):  # in the request (the key) exactly when the cache is top-p
            if request.get(field) != m.get(field):
                return (
                    f"says {field} {m.get(field)!r}, but the request the cache was built for (its key) says "
                    f"{request.get(field)!r}"
                )
        if self.ragged:
            top_p, min_k = m["top_p"], m["min_k"]
            if not (isinstance(top_p, float) and 0 < top_p < 1):
                return f"has a malformed top_p {top_p!r} (want 0 < top_p < 1)"
            if not (isinstance(min_k, int) and not isinstance(min_k, bool) and 1 <= min_k <= top_k):
                return f"has a malformed min_k {min_k!r} (want 1 <= min_k <= top_k {top_k})"
        return ""

    def size_problem(self, values: dict[str, int], rows: int, m: dict) -> tuple[str, dict[str, tuple[int, str]]]:
        k = int(m["top_k"])
        lists = [n for n, t in self.encoded_fields if pa.types.is_list(t)]
        if not self.ragged:
            return "", {c: (k, f"top_k {k}") for c in lists}
        # Top-p: min_k..top_k values per position, the same number in every list column. Each row's own length
        # is checked when it is decoded; the footer holds only the totals.
        lo, counts = int(m["min_k"]), [values[c] for c in lists]
        if len(set(counts)) > 1:
            return f"holds {dict(zip(lists, counts))} list values; a position's lists must have one length", {}
        if not rows * lo <= counts[0] <= rows * k:
            return (
                f"holds {counts[0] / max(rows, 1):g} '{lists[0]}' values per position, but the manifest's top-p "
                f"keeps {lo} to {k}"
            ), {}
        return "", {}

    def shard_columns(self, out: dict[str, np.ndarray], config: Any) -> dict[str, pa.Array]:
        valid = np.arange(config.top_k) < out["kept"][:, None] if self.ragged else None
        packed = self.pack(out["ids"], out["logp"], valid)
        lists = {
            n: ragged_list(a, valid) if valid is not None else fixed_list(a, config.top_k)
            for n, a in packed.items()
            if a.ndim == 2
        }
        return {
            **{n: lists[n] if n in lists else pa.array(a) for n, a in packed.items()},
            "logz": pa.array(out["logz"]),
            "tail_mass": pa.array(out["tail"]),
        }

    def decode(self, table: pa.Table, m: dict, top_k: int) -> dict[str, np.ndarray]:
        """A prefix ``top_k`` of a top-p cache keeps min(top_k, kept) ids per position (still exact: the
        log-probs are normalised over the full vocabulary, and the tail is recomputed from the kept ones)."""
        k = int(m["top_k"])
        keep = top_k or k
        lists = [n for n, t in self.encoded_fields if pa.types.is_list(t)]
        valid = None
        if self.ragged:
            lengths = np.diff(table.column(lists[0]).combine_chunks().offsets.to_numpy())
            bad = (lengths < int(m["min_k"])) | (lengths > k)
            if bad.any():
                raise CacheError(
                    f"a shard row holds {lengths[bad][0]} ids, outside the manifest's top-p range of {m['min_k']} "
                    f"to {k}; the cache is damaged: remove it and run cache-teacher again"
                )
            valid = np.arange(k) < lengths[:, None]
        packed = {
            n: (padded(table.column(n), k) if self.ragged else flat(table.column(n)).reshape(-1, k))
            if n in lists
            else table.column(n).to_numpy()
            for n, _ in self.encoded_fields
        }
        # The whole k first: an encoding may rescale over all of it; a prefix of exact log-probs stays exact.
        ids, logp = self.unpack(packed, table.column("tail_mass").to_numpy(), valid)
        out = {
            "ids": ids[:, :keep].astype(np.int64),
            "logp": np.ascontiguousarray(logp[:, :keep], dtype=np.float32),
            "logz": table.column("logz").to_numpy(),
        }
        return out | ({} if valid is None else {"valid": np.ascontiguousarray(valid[:, :keep])})

    def plain(self, table: pa.Table, m: dict) -> dict[str, pa.Array]:
        """Format 1's columns; a top-p cache keeps its ragged lists (the kept ids of each position)."""
        k = int(m["top_k"])
        decoded = self.decode(table, m, 0)
        ids, logp = decoded["ids"].astype(np.int32), decoded["logp"]
        valid = decoded.get("valid")
        return {
            "topk_ids": fixed_list(ids, k) if valid is None else ragged_list(ids, valid),
            "topk_logp": fixed_list(logp, k) if valid is None else ragged_list(logp, valid),
            "logz": table.column("logz"),
            "tail_mass": table.column("tail_mass"),
        }

    def batch_targets(self, t: dict, m: dict) -> Any:
        from stages.losses import SoftTargets  # torch: loaded only by the trainer's loader

        temperature, vocab = float(m["temperature"]), int(m["teacher"]["num_classes"])
        return SoftTargets(t["ids"], t["logp"], t["logz"], temperature, vocab, t.get("valid"))

    def loss(self, alpha: float, temperature: float) -> Any:
        return None

    def sql_columns(self) -> str:
        return f"{self.ids_sql()} AS topk_ids, {self.logp_sql()} AS topk_logp, logz, tail_mass"

    def describe(self, m: dict) -> str:
        top_p = f" top-p {m['top_p']:g} (at least {m['min_k']})" if self.ragged else ""
        return f"top-{m['top_k']}{top_p}" + ("" if self.encoding == "fp32" else f", {self.encoding} log-probs")

    def statistics_sql(self, source: str, m: dict) -> tuple[str, dict[str, str], str]:
        """tail_mass and top1_prob (= exp(topk_logp[1])) are exact. The teacher's entropy at T is not stored, so it
        is bracketed from the top-k and the tail: the cached ids contribute -sum p log p exactly; the tail mass m
        over the V-k uncached ids contributes at least -m log p_k (no uncached id is likelier than the k-th) and
        at most -m log(m / (V-k)) (spread uniformly). With k = V both bounds are the exact entropy. A top-p
        cache's k is each position's own (its list length), and its mean is reported as kept_ids.
        """
        vocab = int(m["teacher"]["num_classes"] or 0)
        query = f"""
            SELECT tail, top1, kept,
                   h_top + CASE WHEN tail > 0 AND logp_min > -1e30 THEN -tail * logp_min ELSE 0 END AS entropy_lower,
                   h_top + CASE WHEN tail > 0 AND uncached > 0 THEN -tail * ln(tail / uncached) ELSE 0 END
                       AS entropy_upper
            FROM (SELECT greatest(tail_mass::DOUBLE, 0) AS tail, exp(topk_logp[1]::DOUBLE) AS top1,
                         topk_logp[-1]::DOUBLE AS logp_min, len(topk_logp)::DOUBLE AS kept,
                         greatest({vocab} - len(topk_logp), 0) AS uncached,
                         list_sum([CASE WHEN x > -1e30 THEN -exp(x) * x ELSE 0 END FOR x IN topk_logp::DOUBLE[]])
                             AS h_top
                  FROM ({source}))"""
        names = {"tail": "tail_mass", "top1": "top1_prob"} | ({"kept": "kept_ids"} if self.ragged else {})
        names |= {"entropy_lower": "entropy_lower", "entropy_upper": "entropy_upper"}
        return query, names, "entropy bracketed from the top-k and the tail"

    @property
    def has_tail(self) -> bool:
        return True

    @property
    def exact_logp(self) -> bool:
        return True


def to_gaps(ids: np.ndarray, values: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, k] ids and per-id values -> (int32 gaps between the ids in ascending order, the values in that order).

    Ascending ids differ by small numbers, which BYTE_STREAM_SPLIT and zstd shrink to about a byte each.
    ``valid`` [N, k] bool: the slots that hold an id (None: all); they are sorted first in each row, the rest after
    them (their gaps and values are not meant to be stored)."""
    wide = ids.astype(np.int64)
    key = wide if valid is None else np.where(valid, wide, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    ascending = np.take_along_axis(wide, order, 1)
    return np.diff(ascending, axis=1, prepend=0).astype(np.int32), np.take_along_axis(values, order, 1)


def from_gaps(
    gaps: np.ndarray, values: np.ndarray, rank: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Undo ``to_gaps``: (int32 ids, values), each row put in the order ``rank`` (indices into id order).
    ``valid``: each row's stored prefix, which ``rank`` must put first; the other slots become id 0."""
    ids = np.take_along_axis(np.cumsum(gaps, axis=1, dtype=np.int64), rank, 1).astype(np.int32)
    return ids if valid is None else np.where(valid, ids, 0), np.take_along_axis(values, rank, 1)


GAP_OPTIONS = {"compression_level": 19, "column_encoding": {"topk_gaps.list.element": "BYTE_STREAM_SPLIT"}}
# The gaps' SQL: absolute ids (a running sum), computed once per row in the view's subquery.
_ASCENDING_IDS_SQL = "[list_sum(topk_gaps[1:j]) FOR j IN range(1, len(topk_gaps) + 1)] AS _ascending_ids"


class TopKFp16(TopK):
    """Log-probs as float16 (|error| <= 2^-11 |log p|, 3 * 2^-11 for an id that rounds level with the top-1 and
    is stored a step below it; written PLAIN: DuckDB cannot read BYTE_STREAM_SPLIT float16), ids ascending as gaps
    with their log-probs in the same order; decoding sorts by log-prob (ties by id), the argmax first.
    """

    encoding = "fp16"
    fixed_version = 2
    encoded_fields = (("topk_gaps", pa.list_(pa.int32())), ("topk_logp", pa.list_(pa.float16())))
    parquet_options = GAP_OPTIONS

    def pack(self, ids: np.ndarray, logp: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        values = logp.astype(np.float16)
        # The top-1 alone keeps its value: an id that rounds level with it (or above) is stored one float16 step
        # below, so readers, which sort by value and then by id, still put the teacher's argmax first.
        values[:, 1:] = np.minimum(values[:, 1:], np.nextafter(values[:, :1], np.float16(-np.inf)))
        gaps, values = to_gaps(ids, values, valid)
        return {"topk_gaps": gaps, "topk_logp": values}

    def unpack(
        self, packed: dict[str, np.ndarray], tail: np.ndarray, valid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        values = packed["topk_logp"].astype(np.float32)
        if valid is not None:  # padding last; a stable sort keeps a stored -inf ahead of it
            values = np.where(valid, values, -np.inf).astype(np.float32)
        rank = np.argsort(-values, axis=1, kind="stable")  # descending probability, ties by id
        return from_gaps(packed["topk_gaps"], values, rank, valid)

    def sql_source(self, read: str) -> str:
        return f"(SELECT *, {_ASCENDING_IDS_SQL} FROM {read})"

    def ids_sql(self) -> str:
        return "[_ascending_ids[i]::INTEGER FOR i IN list_grade_up([-x FOR x IN topk_logp::FLOAT[]])]"

    def logp_sql(self) -> str:
        return "list_reverse_sort(topk_logp::FLOAT[])"


INT8_LEVELS = 63  # code steps of sqrt(p / p_1): 6 bits of the byte, measured enough (benchmarks/encodings.py)
_PAD_CODE = np.uint8(255)  # above every code: a top-p cache's padding sorts after its kept ids


class TopKInt8(TopK):
    """8-bit probability codes and delta-coded ids, the most compact top-k.

    Per position, code c_i = round((1 - sqrt(p_i / p_1)) * INT8_LEVELS), one byte: square-root spacing puts the
    resolution where the probability mass is (the KL an error costs scales with p_i), and few distinct codes
    compress well. Decoding takes u_i = max(1 - c_i / INT8_LEVELS, 1 / (2 INT8_LEVELS)), p_i proportional to u_i^2,
    rescaled so the top-k sums to 1 - tail_mass (the tail stays exact); the top-1's code is 0, so p_1 need not be
    stored: |sqrt(p_i / p_1) decoded - exact| <= 1 / (2 INT8_LEVELS). Code 0 is the top-1's alone (another id
    that would round to 0 gets 1, so within 1 / INT8_LEVELS): the teacher's argmax stays first however close
    the runner-up.
    Ids are stored in ascending order as gaps from the previous one (small numbers: BYTE_STREAM_SPLIT and zstd
    level 19 shrink them), their codes in the same order; decoding sorts by code, ties by id, so readers get ids
    by descending decoded probability (ids of equal code have equal decoded probability).
    """

    encoding = "int8"
    fixed_version = 2
    encoded_fields = (("topk_gaps", pa.list_(pa.int32())), ("topk_q", pa.list_(pa.uint8())))
    parquet_options = GAP_OPTIONS

    def pack(self, ids: np.ndarray, logp: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        root = np.exp((logp.astype(np.float64) - logp[:, :1]) / 2)  # sqrt(p_i / p_1) in [0, 1]
        codes = np.rint((1 - root) * INT8_LEVELS).astype(np.uint8)
        codes[:, 1:] = np.maximum(codes[:, 1:], 1)  # code 0 is the top-1's alone: readers put the argmax first
        gaps, codes = to_gaps(ids, codes, valid)
        return {"topk_gaps": gaps, "topk_q": codes}

    def unpack(
        self, packed: dict[str, np.ndarray], tail: np.ndarray, valid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        codes = packed["topk_q"] if valid is None else np.where(valid, packed["topk_q"], _PAD_CODE)  # padding last
        rank = np.argsort(codes, axis=1, kind="stable")  # ascending code = descending probability
        ids, q = from_gaps(packed["topk_gaps"], codes.astype(np.float64), rank, valid)
        rel = 2 * np.log(np.maximum(1 - q / INT8_LEVELS, 0.5 / INT8_LEVELS))  # log(p_i / p_1), <= 0
        if valid is not None:  # the kept ids alone are rescaled to 1 - tail
            rel = np.where(valid, rel, -np.inf)
        norm = np.log(np.maximum(1 - tail.astype(np.float64), np.finfo(np.float64).tiny))
        return ids, (rel + (norm - np.log(np.exp(rel).sum(1)))[:, None]).astype(np.float32)

    @staticmethod
    def _rel_sql(code: str) -> str:
        return f"2 * ln(greatest(1 - {code}::DOUBLE / {INT8_LEVELS}, {0.5 / INT8_LEVELS}))"

    def sql_source(self, read: str) -> str:
        # Once per row: the absolute ids and the log normaliser of the codes.
        lse = f"ln(list_sum([exp({self._rel_sql('c')}) FOR c IN topk_q]))"
        norm = f"ln(greatest(1 - tail_mass::DOUBLE, 1e-300)) - {lse}"
        return f"(SELECT *, {_ASCENDING_IDS_SQL}, {norm} AS _logp_norm FROM {read})"

    def ids_sql(self) -> str:
        return "[_ascending_ids[i]::INTEGER FOR i IN list_grade_up(topk_q)]"

    def logp_sql(self) -> str:
        return f"[({self._rel_sql('q')} + _logp_norm)::FLOAT FOR q IN list_sort(topk_q)]"
