"""Sampled targets: distinct ids drawn from the teacher's softmax, with counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from stages.formats.base import TargetFormat, padded, ragged_list


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
            SELECT len(sample_ids)::DOUBLE AS distinct_ids,
                   list_max(sample_counts)::DOUBLE / {int(m["samples"])} AS top_frequency
            FROM ({source})"""
        return (
            query,
            {"distinct_ids": "distinct_ids", "top_frequency": "top_draw_frequency"},
            "the draws of each position",
        )
