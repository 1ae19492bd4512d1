"""The target-format classes: each one's columns, shard encoding and decoding, and DuckDB view agree."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from stages import cache_teacher
from stages.cache_format import MANIFEST_CHECKSUM, open_cache, shard_schema, write_manifest
from stages.config import CacheTeacherConfig
from stages.dataset import Dataset
from stages.errors import CacheError
from stages.formats import ENCODINGS, FORMATS, INT8_LEVELS, by_id, format_of, get_format, view_columns
from stages.loader import StreamingLoader
from stages.losses import KDLoss

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


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 64),
    st.floats(0.05, 30.0),
    st.integers(0, 2**31),
)
def test_every_encoding_decodes_within_its_bound(n: int, k: int, scale: float, seed: int) -> None:
    """decode(encode(log p)) with the exact tail: fp32 exact, fp16 within half an ulp, int8 within one step."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k + 5)) * scale
    logp_all = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    order = np.argsort(-logp_all, 1, kind="stable")[:, :k]
    ids = rng.permutation(10_000)[order].astype(np.int32)  # arbitrary distinct ids of a large vocabulary
    logp = np.take_along_axis(logp_all, order, 1).astype(np.float32)
    tail = np.maximum(1 - np.exp(logp.astype(np.float64)).sum(1), 0).astype(np.float32)
    for name, encoding in ENCODINGS.items():
        decoded_ids, decoded = encoding.unpack(encoding.pack(ids, logp), tail)
        assert decoded.shape == logp.shape and decoded.dtype == np.float32
        assert (np.diff(decoded, axis=1) <= 0).all()  # by descending (decoded) probability
        np.testing.assert_array_equal(np.sort(decoded_ids, 1), np.sort(ids, 1))  # the same ids
        assert (decoded_ids[:, 0] == ids[:, 0]).all()  # the teacher's argmax first, however close the runner-up
        err = np.abs(by_id(decoded_ids, decoded) - by_id(ids, logp))
        # An id level with the top-1 after rounding is stored a step below it: a wider bound for those alone.
        if name == "fp32":
            assert (err == 0).all() and (decoded_ids == ids).all()
        elif name == "fp16":
            f16 = logp.astype(np.float16)
            level = by_id(ids, ((f16 >= f16[:, :1]) & (np.arange(k) > 0)).astype(np.float32)) > 0
            assert (err <= np.where(level, 3 * 2.0**-11, 2.0**-11) * np.abs(by_id(ids, logp)) + 2.0**-24).all()
        else:  # codes of sqrt(p_i / p_1): within half a code step of it, ids matched by id
            root = np.exp((by_id(ids, logp) - logp[:, :1].astype(np.float64)) / 2)
            decoded_root = np.exp((by_id(decoded_ids, decoded) - decoded[:, :1].astype(np.float64)) / 2)
            codes = np.rint((1 - np.exp((logp - logp[:, :1].astype(np.float64)) / 2)) * INT8_LEVELS)
            level = by_id(ids, ((codes == 0) & (np.arange(k) > 0)).astype(np.float32)) > 0
            assert (np.abs(decoded_root - root) <= np.where(level, 1.0, 0.5) / INT8_LEVELS + 1e-5).all()
            # Rescaled: the decoded top-k and the exact tail make a distribution.
            np.testing.assert_allclose(np.exp(decoded.astype(np.float64)).sum(1) + tail, 1.0, rtol=1e-5)


def test_a_close_runner_up_never_displaces_the_argmax(tmp_path: Path) -> None:
    """Logits [0, 4.99, 5.0, -1]: ids 2 and 1 round to one int8 code (and nearly one float16 value); the
    decoded top-1 is still id 2, in the loader's decoding and in the DuckDB view's."""
    z = np.array([[0.0, 4.99, 5.0, -1.0]])
    logp_all = z - np.log(np.exp(z).sum(1, keepdims=True))
    ids = np.argsort(-logp_all, 1)[:, :2].astype(np.int32)
    logp = np.take_along_axis(logp_all, ids, 1).astype(np.float32)
    tail = (1 - np.exp(logp.astype(np.float64)).sum(1)).astype(np.float32)
    for name, encoding in ENCODINGS.items():
        packed = encoding.pack(ids, logp)
        decoded_ids, decoded = encoding.unpack(packed, tail)
        assert decoded_ids.tolist() == [[2, 1]], name
        assert decoded[0, 0] > decoded[0, 1], name
        types = dict(encoding.encoded_fields)
        stored = tmp_path / f"{name}.parquet"  # as shards are read: DuckDB reads float16 from Parquet only
        pq.write_table(
            pa.table({c: pa.array([packed[c][0].tolist()], types[c]) for c in packed} | {"tail_mass": tail}), stored
        )
        read = encoding.sql_source(f"read_parquet('{stored}')")
        assert duckdb.sql(f"SELECT {encoding.ids_sql()} FROM {read}").fetchall() == [([2, 1],)], name


def test_int8_is_exact_when_k_is_one_and_orders_ties_by_id() -> None:
    logp = np.log(np.array([[0.7], [0.2]], np.float32))
    tail = (1 - np.exp(logp[:, 0])).astype(np.float32)
    int8 = ENCODINGS["int8"]
    ids, decoded = int8.unpack(int8.pack(np.array([[7], [3]], np.int32), logp), tail)
    np.testing.assert_allclose(decoded, logp, atol=1e-6)
    assert ids.tolist() == [[7], [3]]
    wide = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.05]], np.float32))
    ids, decoded = int8.unpack(int8.pack(np.array([[40, 2, 9, 31, 5]], np.int32), wide), np.zeros(1, np.float32))
    assert ids.tolist() == [[40, 2, 9, 5, 31]]  # descending probability; the tie of 0.05 by ascending id
    assert (np.diff(decoded[0]) <= 0).all()


@pytest.fixture
def encoded_caches(token_setup: dict, tmp_path: Path) -> dict:
    """One token teacher cached at k = 16 in every encoding (V = 50)."""
    out = {}
    for name in ENCODINGS:
        config = CacheTeacherConfig(
            teacher=str(token_setup["teacher"]),
            data=str(token_setup["data"]),
            cache_dir=str(tmp_path / "cache"),
            top_k=16,
            encoding=name,
        )
        out[name] = open_cache(cache_teacher.run(config, progress=False, log=lambda m: None).path)
    return {**token_setup, "caches": out, "root": tmp_path / "cache", "runs": tmp_path / "runs"}


def _loader_targets(cache, data: str) -> tuple[np.ndarray, np.ndarray]:
    loader = StreamingLoader(
        Dataset(data), [cache], input_columns=["input_ids"], batch_size=64, token_level=True, shuffle=False
    )
    ids, logp = [], []
    for batch in loader:
        t = batch.targets[0]
        ids.append(t.ids[batch.mask].numpy())
        logp.append(t.logp[batch.mask].numpy())
    return np.concatenate(ids), np.concatenate(logp)


def test_readers_agree_across_encodings(encoded_caches: dict) -> None:
    """Loader, DuckDB view, caches show and the probe: every encoding reads back as the fp32 cache, within bound."""
    caches, data = encoded_caches["caches"], str(encoded_caches["data"])
    assert len({c.key for c in caches.values()}) == 3
    assert "encoding" not in caches["fp32"].manifest["request"]  # fp32 keeps format 1's keys
    for c in caches.values():
        c.verify(checksums=True)
    sizes = {n: c.manifest["bytes_per_position"] for n, c in caches.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]

    ids32, logp32 = _loader_targets(caches["fp32"], data)
    for name in ("fp16", "int8"):
        ids, logp = _loader_targets(caches[name], data)
        # The same ids per position by descending probability; int8 may order ids of equal code by id.
        np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ids32, 1))
        assert (np.diff(logp, axis=1) <= 0).all()
        exact, got = by_id(ids32, logp32), by_id(ids, logp)
        if name == "fp16":
            assert (np.abs(got - exact) <= 2.0**-11 * np.abs(exact) + 1e-6).all()
        else:  # probabilities within half a code step in sqrt(p / p_1), and the KL tiny
            root = np.sqrt(np.exp(exact) / np.exp(exact).max(1, keepdims=True))
            decoded_root = np.sqrt(np.exp(got) / np.exp(got).max(1, keepdims=True))
            level = root >= 1 - 0.5 / INT8_LEVELS  # rounds level with the top-1: stored a code below it
            level[np.arange(len(root)), exact.argmax(1)] = False
            assert (np.abs(decoded_root - root) <= np.where(level, 1.0, 0.5) / INT8_LEVELS + 1e-4).all()
            assert (np.exp(exact) * (exact - got)).sum(1).mean() < 1e-3
        probe = caches[name].manifest["fidelity"]
        assert probe["encoding"] == name and probe["encoding_max_abs_dlogp"] > 0
        assert abs(probe["encoding_kl_mean"]) < 1e-3
    assert caches["fp32"].manifest["fidelity"]["encoding_max_abs_dlogp"] == 0

    runner = CliRunner()
    sql = (
        "SELECT cache_key, id, position, topk_ids, topk_logp, tail_mass FROM positions ORDER BY cache_key, id, position"
    )
    got = runner.invoke(main, ["query", sql, "--cache-dir", str(encoded_caches["root"]), "--format", "json"])
    assert got.exit_code == 0, got.output
    rows = json.loads(got.output)
    by_cache = {n: [r for r in rows if r["cache_key"] == c.key] for n, c in caches.items()}
    assert len(by_cache["int8"]) == len(ids32)
    # The view decodes every encoding exactly as the loader does (the loader is in dataset order, unshuffled).
    for name, cache in caches.items():
        ids, logp = _loader_targets(cache, data)
        np.testing.assert_array_equal(np.array([r["topk_ids"] for r in by_cache[name]]), ids)
        np.testing.assert_allclose(np.array([r["topk_logp"] for r in by_cache[name]]), logp, atol=1e-5)

    shown = runner.invoke(main, ["caches", "show", caches["int8"].key, "--cache-dir", str(encoded_caches["root"])])
    assert shown.exit_code == 0, shown.output
    assert "top-16, int8 log-probs" in shown.output and "int8-decoded" in shown.output and "top-1 prob" in shown.output


def test_a_format_1_manifest_without_an_encoding_reads_as_fp32(encoded_caches: dict) -> None:
    cache = encoded_caches["caches"]["fp32"]
    manifest = {k: v for k, v in cache.manifest.items() if k not in ("encoding", MANIFEST_CHECKSUM)}
    write_manifest(manifest, cache.path)
    reopened = open_cache(cache.path)
    assert reopened.format.encoding == "fp32" and reopened.key == cache.key
    reopened.verify(checksums=True)
    ids, _ = _loader_targets(reopened, str(encoded_caches["data"]))
    assert len(ids) == reopened.manifest["num_positions"]


def test_encoded_caches_are_format_2_so_older_readers_refuse_them(encoded_caches: dict) -> None:
    versions = {n: c.manifest["format_version"] for n, c in encoded_caches["caches"].items()}
    assert versions == {"fp32": 1, "fp16": 2, "int8": 2}
    cache = encoded_caches["caches"]["int8"]
    write_manifest(
        {k: v for k, v in cache.manifest.items() if k != MANIFEST_CHECKSUM} | {"format_version": 1}, cache.path
    )
    with pytest.raises(CacheError, match="says format_version 1, but top-16, int8 log-probs targets are version 2"):
        open_cache(cache.path)


def test_an_encoding_edited_into_a_manifest_is_refused(encoded_caches: dict) -> None:
    cache = encoded_caches["caches"]["fp16"]
    write_manifest(
        {k: v for k, v in cache.manifest.items() if k != MANIFEST_CHECKSUM} | {"encoding": "int8"}, cache.path
    )
    with pytest.raises(CacheError, match="says encoding 'int8'"):
        open_cache(cache.path)


def test_encoding_applies_to_top_k_only() -> None:
    problems = CacheTeacherConfig(teacher="t", data="d", target_format="sampled", encoding="int8").problems()
    assert any("encoding: int8 applies to top-k" in p for p in problems)
    assert any("must be one of" in p for p in CacheTeacherConfig(teacher="t", data="d", encoding="bf8").problems())


def test_caches_export_writes_decoded_plain_targets(encoded_caches: dict, tmp_path: Path) -> None:
    caches, root = encoded_caches["caches"], str(encoded_caches["root"])
    runner = CliRunner()
    tables = {}
    for name, cache in caches.items():
        out = tmp_path / f"{name}.parquet"
        got = runner.invoke(main, ["caches", "export", cache.key[:8], "--cache-dir", root, "--out", str(out)])
        assert got.exit_code == 0, got.output
        assert got.stdout.splitlines()[-1] == str(out)
        tables[name] = pq.read_table(out)
        assert tables[name].schema.equals(shard_schema(pa.int64(), [])), tables[name].schema
    original = pa.concat_tables(caches["fp32"].iter_tables())
    assert tables["fp32"].equals(original.select(tables["fp32"].column_names))  # fp32 exports the cache as it is
    for name in ("fp16", "int8"):  # the loader's decoding, written out
        ids, logp = _loader_targets(caches[name], str(encoded_caches["data"]))
        np.testing.assert_array_equal(np.array(tables[name].column("topk_ids").to_pylist()), ids)
        np.testing.assert_array_equal(np.array(tables[name].column("topk_logp").to_pylist()), logp)


def test_caches_export_refuses_a_sampled_cache(token_setup: dict, tmp_path: Path) -> None:
    config = CacheTeacherConfig(
        teacher=str(token_setup["teacher"]),
        data=str(token_setup["data"]),
        cache_dir=str(tmp_path / "cache"),
        target_format="sampled",
        samples=8,
    )
    key = cache_teacher.run(config, progress=False, log=lambda m: None).path.name
    out = tmp_path / "x.parquet"
    got = CliRunner().invoke(main, ["caches", "export", key, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert got.exit_code == 1 and "no plain top-k form to export" in got.output and not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_an_fp32_cache_of_every_class_gives_dense_kd(classifier_setup: dict) -> None:
    """k = V through the whole path (cache-teacher, shard, loader, KDLoss) equals dense KD on the teacher's logits."""
    s = classifier_setup
    config = CacheTeacherConfig(teacher=str(s["teacher"]), data=str(s["data"]), cache_dir=str(s["cache_dir"]), top_k=10)
    cache = open_cache(cache_teacher.run(config, progress=False, log=lambda m: None).path)
    batch = next(
        iter(
            StreamingLoader(
                Dataset(str(s["data"])), [cache], input_columns=["x"], batch_size=300, token_level=False, shuffle=False
            )
        )
    )
    w = s["weights"]
    x = batch.inputs["x"].double()
    teacher_logp = torch.log_softmax(
        torch.relu(x @ torch.from_numpy(w["w1"]).double()) @ torch.from_numpy(w["w2"]).double(), -1
    )
    student = torch.randn(300, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(student, -1))).sum(-1).mean()
    cached = KDLoss(1.0, 1.0)(student.float(), batch.targets[0], batch.labels, batch.mask).total
    assert float(cached) == pytest.approx(float(dense), rel=1e-5)


def test_train_and_report_on_an_int8_cache(encoded_caches: dict, tmp_path: Path) -> None:
    """The trainer and `report` read an int8 cache: the decoded tail mass equals the fp32 cache's."""
    root, runs = str(encoded_caches["root"]), str(tmp_path / "runs")
    cache = encoded_caches["caches"]["int8"]
    runner = CliRunner()
    trained = runner.invoke(
        main,
        [
            "train-student",
            "--data",
            str(encoded_caches["data"]),
            "--cache",
            cache.key,
            "--cache-dir",
            root,
            "--student",
            "causal-lm:layers=1,d_model=16,heads=2",
            "--epochs",
            "1",
            "--out",
            f"{runs}/int8",
            "--no-onnx",
        ],
    )
    assert trained.exit_code == 0, trained.output
    got = runner.invoke(
        main, ["report", "int8", "--out", str(tmp_path / "rep"), "--cache-dir", root, "--runs-dir", runs]
    )
    assert got.exit_code == 0, got.output
    page = (tmp_path / "rep" / "report.md").read_text()
    tail = float(np.mean(pa.concat_tables(encoded_caches["caches"]["fp32"].iter_tables(["tail_mass"])).column(0)))
    assert (
        "top-16, int8 log-probs" in page
        and f"Tail mass (probability outside the cached top-k): mean {tail:.4g}" in page
    )
