"""The target-format classes: each one's columns, shard encoding and decoding, and DuckDB view agree."""

from __future__ import annotations

from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.errors import CacheError
from stages.target_formats import FORMATS, format_of, get_format, view_columns

ROWS, K, SAMPLES, V = 5, 4, 6, 50


def _runner_output(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the shard runner hands a format: per-position arrays in dataset order."""
    logits = rng.normal(size=(ROWS, V))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-logp, 1)[:, :K]
    top = np.take_along_axis(logp, ids, 1).astype(np.float32)
    counts = np.zeros((ROWS, SAMPLES), np.int16)
    counts[:, :3] = [3, 2, 1]  # three distinct ids drawn per position, padding after
    return {
        "ids": ids.astype(np.int32),
        "logp": top,
        "logz": rng.normal(size=ROWS).astype(np.float32),
        "tail": (1 - np.exp(top).sum(1)).astype(np.float32),
        "sample_ids": np.tile(np.arange(SAMPLES, dtype=np.int32), (ROWS, 1)),
        "sample_counts": counts,
    }


def _manifest(name: str) -> dict:
    return {
        "target_format": name,
        "top_k": K if name == "topk" else 0,
        "samples": SAMPLES,
        "temperature": 1.0,
        "teacher": {"num_classes": V},
        "request": {},
    }


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_shard_columns_decode_back_to_the_runner_output(name: str) -> None:
    target_format, out = get_format(name), _runner_output(np.random.default_rng(0))
    config = SimpleNamespace(top_k=K, samples=SAMPLES, sample_seed=0)
    columns = target_format.shard_columns(out, config)
    assert tuple(columns) == target_format.columns == tuple(f.name for f in target_format.fields())
    table = pa.table(columns, schema=pa.schema(target_format.fields()))
    decoded = target_format.decode(table, _manifest(name), 0)
    if name == "topk":
        np.testing.assert_array_equal(decoded["ids"], out["ids"])
        np.testing.assert_array_equal(decoded["logp"], out["logp"])
        np.testing.assert_array_equal(decoded["logz"], out["logz"])
        prefix = target_format.decode(table, _manifest(name), 2)
        np.testing.assert_array_equal(prefix["ids"], out["ids"][:, :2])
    else:
        np.testing.assert_array_equal(decoded["ids"][:, :3], out["sample_ids"][:, :3])
        np.testing.assert_allclose(decoded["weights"].sum(1), 1.0)  # 6 draws of 6
        assert (decoded["weights"][:, 3:] == 0).all()


def test_positions_view_has_one_schema_whatever_the_format(tmp_path) -> None:
    """Each format's shard, read through its view columns, unions with the others (the `positions` view)."""
    out, config = _runner_output(np.random.default_rng(1)), SimpleNamespace(top_k=K, samples=SAMPLES, sample_seed=0)
    selects = []
    for name, target_format in FORMATS.items():
        columns = {"id": pa.array(np.arange(ROWS)), "position": pa.array(np.zeros(ROWS, np.int32))}
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(columns | target_format.shard_columns(out, config)), path)
        selects.append(f"SELECT '{name}' AS f, id, position, {view_columns(target_format)} FROM '{path}'")
    selects.append(f"SELECT 'none', 0, 0, {view_columns(None)} WHERE false")
    rows = duckdb.sql(" UNION ALL ".join(selects) + " ORDER BY f, id").fetchall()
    assert len(rows) == ROWS * len(FORMATS)
    topk = [r for r in rows if r[0] == "topk"]
    np.testing.assert_allclose([r[4] for r in topk], out["logp"].tolist(), rtol=1e-6)  # topk_logp
    assert all(r[7] is None for r in topk)  # sample_ids are NULL on a top-k cache


def test_a_manifest_without_a_format_is_top_k_and_an_unknown_one_is_refused() -> None:
    assert format_of({}).name == "topk"
    with pytest.raises(CacheError, match="unknown target format 'dense'"):
        format_of({"target_format": "dense"})
