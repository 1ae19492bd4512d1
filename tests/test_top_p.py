"""Top-p caches (cache-teacher --top-p P --min-k M): the lengths, the tail, every encoding on ragged lists, every
reader, the KD losses on padded targets, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from torch import Tensor

from pipeline.cli import main
from stages import cache_teacher, targets, train_student
from stages.cache_format import MANIFEST_CHECKSUM, open_cache, write_manifest
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.dataset import Dataset
from stages.errors import CacheError, ConfigError
from stages.formats import ENCODINGS, INT8_LEVELS, TOP_P_ENCODINGS, by_id
from stages.loader import StreamingLoader
from stages.losses import EnsembleKDLoss, KDLoss, SoftTargets, retemper

FAST = settings(max_examples=60, deadline=None)
K, P, MIN_K = 16, 0.8, 2  # the end-to-end caches: top-16 of V = 50, probability 0.8, at least 2 ids


def _sorted_logp(rng: np.random.Generator, n: int, v: int, scale: float) -> np.ndarray:
    """[n, v] float64 full-vocabulary log-probabilities, each row by descending probability."""
    logits = rng.normal(size=(n, v)) * scale
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return -np.sort(-logp, axis=1)


# ---- the lengths and the tail ------------------------------------------------------------------------------
@FAST
@given(st.integers(1, 8), st.integers(1, 40), st.floats(0.05, 10.0), st.floats(0.01, 1.0), st.data())
def test_top_p_keeps_the_smallest_prefix_reaching_p(n: int, k: int, scale: float, p: float, data) -> None:
    v = k + data.draw(st.integers(0, 10))
    min_k = data.draw(st.integers(1, k))
    logp = _sorted_logp(np.random.default_rng(data.draw(st.integers(0, 2**31))), n, v, scale)[:, :k]
    lengths = targets.top_p_lengths(torch.from_numpy(logp).float(), p, min_k)
    assert lengths.dtype == torch.int64 and lengths.shape == (n,)
    probs = np.exp(logp.astype(np.float32).astype(np.float64))  # what the function saw: float32 log-probs
    for row, length in zip(probs, lengths.tolist()):
        assert min_k <= length <= k
        kept = math.fsum(row[:length])
        assert kept >= p - 1e-12 or length == k  # reaches p, unless the whole top-k cannot
        # Smallest: one id fewer is below p, or min_k forbids fewer.
        assert length == min_k or math.fsum(row[: length - 1]) < p + 1e-12


def test_top_p_known_lengths() -> None:
    probs = [[0.5, 0.25, 0.125, 0.0625], [0.875, 0.0625, 0.03125, 0.015625], [0.25, 0.125, 0.125, 0.0625]]
    logp = torch.log(torch.tensor(probs))
    assert targets.top_p_lengths(logp, 0.7, 1).tolist() == [2, 1, 4]  # 0.5 + 0.25; 0.875; never reaches 0.7
    assert targets.top_p_lengths(logp, 0.7, 3).tolist() == [3, 3, 4]
    assert targets.top_p_lengths(logp, 1.0, 1).tolist() == [4, 4, 4]


@FAST
@given(st.integers(1, 6), st.integers(2, 30), st.floats(0.1, 10.0), st.integers(0, 2**31))
def test_tail_mass_with_padding_is_the_mass_outside_the_kept_ids(n: int, v: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logp = torch.from_numpy(_sorted_logp(rng, n, v, scale))  # k = V: a fixed-k row would have no tail
    kept = torch.from_numpy(rng.integers(1, v + 1, size=n))
    valid = torch.arange(v) < kept[:, None]
    padded = logp.masked_fill(~valid, -math.inf)
    got = targets.tail_mass(padded, v, valid)
    expected = torch.tensor(
        [1 - math.fsum(np.exp(r[:c]).tolist()) for r, c in zip(logp.numpy(), kept.tolist())], dtype=torch.float64
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected.clamp(0, 1), rtol=1e-9, atol=1e-12)
    assert (got[kept == v] == 0).all()  # every id kept: no tail, by definition
    # Finite gradients through the padding.
    leaf = padded.clone().requires_grad_(True)
    targets.tail_mass(leaf, v, valid).sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[~valid] == 0).all()


def test_the_reconstructed_distribution_of_a_padded_row_is_that_of_its_kept_ids() -> None:
    """What the fidelity probe compares against: row by row, the kept ids exact and the tail spread uniformly
    over the V - kept others, whatever id the padding holds."""
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(5, 9)) * 2).float()
    ids, logp, _ = targets.topk_log_probs(logits, 9, 1.0)
    kept = torch.tensor([1, 3, 9, 5, 2])
    valid = torch.arange(9) < kept[:, None]
    dense = targets.reconstruct_log_probs(ids.masked_fill(~valid, 0), logp.masked_fill(~valid, -math.inf), 9, valid)
    kl = targets.cache_fidelity_kl(logits, 1.0, ids.masked_fill(~valid, 0), logp.masked_fill(~valid, -math.inf), valid)
    for r, c in enumerate(kept.tolist()):
        own = targets.reconstruct_log_probs(ids[r : r + 1, :c], logp[r : r + 1, :c], 9)
        torch.testing.assert_close(dense[r : r + 1], own)
        torch.testing.assert_close(
            kl[r : r + 1], targets.cache_fidelity_kl(logits[r : r + 1], 1.0, ids[r : r + 1, :c], logp[r : r + 1, :c])
        )
    assert kl[2] == 0  # every id kept


# ---- every encoding on ragged lists -------------------------------------------------------------------------
@FAST
@given(st.integers(1, 30), st.integers(1, 48), st.floats(0.05, 30.0), st.integers(0, 2**31))
def test_every_encoding_decodes_a_ragged_prefix_within_its_bound(n: int, k: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k + 5)) * scale
    logp_all = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp_all, 1, kind="stable")[:, :k]
    ids = rng.permutation(10_000)[order].astype(np.int32)
    ids[ids == 0] = 10_000
    ids[0, 0] = 0  # a kept id 0 (the top-1 is always kept) must not be taken for padding
    logp = np.take_along_axis(logp_all, order, 1).astype(np.float32)
    valid = np.arange(k) < rng.integers(1, k + 1, size=n)[:, None]
    ids, logp = np.where(valid, ids, 0), np.where(valid, logp, -np.inf).astype(np.float32)
    tail = np.maximum(1 - (np.exp(logp.astype(np.float64))).sum(1), 0).astype(np.float32)
    for name, encoding in TOP_P_ENCODINGS.items():
        packed = encoding.pack(ids, logp, valid)
        # Each row's kept values come first: the lists written are the first valid.sum(1) of each row.
        lists = {c: a[valid] for c, a in packed.items() if a.ndim == 2}
        width = valid.sum(1)
        restored = {c: np.zeros_like(a) for c, a in packed.items()}
        for c in lists:
            restored[c][valid] = lists[c]  # what base.padded reads back: left-aligned, zeros after
        decoded_ids, decoded = encoding.unpack(restored, tail, valid)
        assert decoded.dtype == np.float32 and decoded.shape == (n, k)
        assert (decoded_ids[~valid] == 0).all() and (decoded[~valid] == -np.inf).all()
        for r in range(n):
            got = decoded[r, : width[r]]
            assert (np.diff(got) <= 0).all()  # by descending (decoded) probability
            assert sorted(decoded_ids[r, : width[r]]) == sorted(ids[r, : width[r]])
        assert (decoded_ids[:, 0] == ids[:, 0]).all()  # the argmax first
        exact = by_id(ids, logp)
        with np.errstate(invalid="ignore"):  # -inf - -inf at the padding, dropped by the where
            err = np.where(np.isfinite(exact), np.abs(by_id(decoded_ids, decoded) - exact), 0)
        # An id level with the top-1 after rounding is stored a step below it: a wider bound for those alone.
        later = valid & (np.arange(k) > 0)
        if name == "fp32":
            assert (decoded_ids == ids).all() and (decoded == logp).all()
        elif name == "fp16":
            f16 = logp.astype(np.float16)
            level = by_id(ids, (later & (f16 >= f16[:, :1])).astype(np.float32)) > 0
            bound = np.where(level, 3 * 2.0**-11, 2.0**-11) * np.abs(np.where(np.isfinite(exact), exact, 0))
            assert (err <= bound + 2.0**-24).all()
        else:  # rescaled over the kept ids alone: they and the exact tail make a distribution
            np.testing.assert_allclose(np.exp(decoded.astype(np.float64)).sum(1) + tail, 1.0, rtol=1e-5)
            root = np.exp((by_id(ids, logp) - logp[:, :1].astype(np.float64)) / 2)
            decoded_root = np.exp((by_id(decoded_ids, decoded) - decoded[:, :1].astype(np.float64)) / 2)
            codes = np.rint((1 - np.exp((logp - logp[:, :1].astype(np.float64)) / 2)) * INT8_LEVELS)
            level = by_id(ids, (later & (codes == 0)).astype(np.float32)) > 0
            with np.errstate(invalid="ignore"):
                assert (np.abs(decoded_root - root) <= np.where(level, 1.0, 0.5) / INT8_LEVELS + 1e-5).all()


# ---- the losses on padded targets --------------------------------------------------------------------------
def _padded_targets(seed: int, n: int = 7, v: int = 12, k: int = 6, t: float = 1.0) -> tuple[SoftTargets, Tensor]:
    """Top-p-like targets (a prefix of 1..k ids per row; padding id 0 at -inf) whose kept ids never include 0,
    so a loss that knocked the padding's id 0 out of the student's vocabulary would be caught."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    logits[:, 0] = -30.0  # id 0 is never in a top-k of 6 here
    logp_all = torch.log_softmax(logits / t, -1)
    logp, ids = logp_all.topk(k, dim=-1)
    kept = torch.randint(1, k + 1, (n,), generator=g)
    valid = torch.arange(k) < kept[:, None]
    targets_ = SoftTargets(
        ids.masked_fill(~valid, 0),
        logp.masked_fill(~valid, -math.inf),
        torch.logsumexp(logits / t, -1),
        t,
        v,
        valid,
    )
    return targets_, logits


def _dense_reference(targets_: SoftTargets, student: Tensor, t: float, renormalize: bool = False) -> Tensor:
    """Mean KL by hand in float64, row by row: the kept ids exact, every other id in one tail bucket. One
    differentiable expression, so autograd through it gives the reference gradient too."""
    log_q_all = torch.log_softmax(student.double() / t, -1)
    terms = []
    for r in range(student.shape[0]):
        keep = targets_.valid[r]
        ids, log_p = targets_.ids[r][keep], targets_.logp[r][keep].double()
        log_q = log_q_all[r, ids]
        if renormalize:
            log_p, log_q = log_p.log_softmax(-1), log_q.log_softmax(-1)
            terms.append((log_p.exp() * (log_p - log_q)).sum())
        else:
            tail = 1 - log_p.exp().sum()
            q_tail = 1 - log_q.exp().sum()
            terms.append((log_p.exp() * (log_p - log_q)).sum() + tail * (tail.log() - q_tail.log()))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("renormalize", [False, True])
def test_kd_loss_on_a_top_p_batch_equals_the_dense_reference(renormalize: bool) -> None:
    teacher, _ = _padded_targets(0)
    student = torch.randn(7, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    student.requires_grad_(True)
    labels, mask = torch.zeros(7, dtype=torch.long), torch.ones(7, dtype=torch.bool)
    out = KDLoss(1.0, 1.0, renormalize=renormalize)(student, teacher, labels, mask)
    expected = _dense_reference(teacher, student.detach(), 1.0, renormalize)
    torch.testing.assert_close(out.total.detach(), expected, rtol=1e-10, atol=1e-12)
    out.total.backward()
    assert torch.isfinite(student.grad).all()
    # Gradient by hand: the dense reference differentiated by autograd in float64 agrees.
    ref_student = student.detach().clone().requires_grad_(True)
    _dense_reference(teacher, ref_student, 1.0, renormalize).backward()
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-8, atol=1e-10)


def test_padding_is_carried_through_index_to_and_retemper() -> None:
    teacher, logits = _padded_targets(2, t=2.0)
    rows = torch.tensor([True, False, True, True, False, True, True])
    picked = teacher.index(rows).to(torch.device("cpu"))
    assert torch.equal(picked.valid, teacher.valid[rows]) and torch.equal(picked.tail(), teacher.tail()[rows])
    # Re-tempered row by row, the padded targets give what each row's own fixed-k targets give.
    hot = retemper(teacher, 0.7)
    assert torch.equal(hot.valid, teacher.valid)
    for r in range(7):
        keep = teacher.valid[r]
        own = SoftTargets(teacher.ids[r : r + 1, keep], teacher.logp[r : r + 1, keep], teacher.logz[r : r + 1], 2.0, 12)
        want = retemper(own, 0.7)
        torch.testing.assert_close(hot.logp[r : r + 1, keep], want.logp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hot.logz[r : r + 1], want.logz, rtol=1e-12, atol=1e-12)
        assert (hot.logp[r, ~keep] == -math.inf).all()


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_an_ensemble_of_one_top_p_teacher_twice_is_that_teacher(mode: str) -> None:
    teacher, _ = _padded_targets(3)
    student = torch.randn(7, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    student.requires_grad_(True)
    labels, mask = torch.zeros(7, dtype=torch.long), torch.ones(7, dtype=torch.bool)
    single = KDLoss(1.0, 1.0)(student, teacher, labels, mask).total
    both = EnsembleKDLoss(1.0, 1.0, mode=mode)(student, [teacher, teacher], labels, mask).total
    torch.testing.assert_close(both, single, rtol=1e-10, atol=1e-12)
    both.backward()
    assert torch.isfinite(student.grad).all()


def test_soft_targets_refuse_a_valid_mask_of_another_shape() -> None:
    teacher, _ = _padded_targets(5)
    with pytest.raises(ConfigError, match="valid mask must be bool"):
        SoftTargets(teacher.ids, teacher.logp, teacher.logz, 1.0, 12, teacher.valid[:, :3])


# ---- end to end: cache-teacher --top-p, every reader ----------------------------------------------------
def _invoke(setup: dict, *flags: str, runner: CliRunner | None = None):
    """``pipeline cache-teacher`` on the setup's teacher, data and cache folder, plus ``flags``."""
    args = ["cache-teacher", "--teacher", str(setup["teacher"]), "--data", str(setup["data"])]
    return (runner or CliRunner()).invoke(main, [*args, "--cache-dir", str(setup["cache_dir"]), *flags])


def _cache(runner: CliRunner, setup: dict, *flags: str) -> str:
    got = _invoke(setup, "--top-k", str(K), "--quiet", *flags, runner=runner)
    assert got.exit_code == 0, got.output
    return Path(got.stdout.splitlines()[-1]).name


def _loaded(cache, data: str, top_k: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The loader's ids, logp and valid mask of every position, in dataset order."""
    loader = StreamingLoader(
        Dataset(data), [cache], input_columns=["input_ids"], batch_size=64, token_level=True, shuffle=False, top_k=top_k
    )
    ids, logp, valid = [], [], []
    for batch in loader:
        t = batch.targets[0]
        ids.append(t.ids[batch.mask].numpy())
        logp.append(t.logp[batch.mask].numpy())
        valid.append(t.slots()[batch.mask].numpy())
    return np.concatenate(ids), np.concatenate(logp), np.concatenate(valid)


@pytest.fixture
def top_p_caches(token_setup: dict) -> dict:
    """The token teacher (V = 50) cached at top-16 fixed, and at top-p 0.8 (min 2) in every encoding."""
    runner = CliRunner()
    keys = {"fixed": _cache(runner, token_setup)}
    for name in ENCODINGS:
        keys[name] = _cache(runner, token_setup, "--top-p", str(P), "--min-k", str(MIN_K), "--encoding", name)
    root = token_setup["cache_dir"]
    return {**token_setup, "keys": keys, "caches": {n: open_cache(root / key) for n, key in keys.items()}}


def test_top_p_caches_hold_the_fixed_caches_rows_truncated(top_p_caches: dict) -> None:
    caches, data = top_p_caches["caches"], str(top_p_caches["data"])
    ids32, logp32, all_valid = _loaded(caches["fixed"], data)
    assert all_valid.all() and caches["fixed"].manifest["format_version"] == 1
    lengths = targets.top_p_lengths(torch.from_numpy(logp32), P, MIN_K).numpy()
    assert 1 < len(set(lengths.tolist()))  # the lists really are ragged here
    truncated = np.arange(K) < lengths[:, None]
    for name, cache in caches.items():
        if name == "fixed":
            continue
        m = cache.manifest
        assert m["format_version"] == 3 and m["top_p"] == P and m["min_k"] == MIN_K
        assert m["request"]["top_p"] == P and m["request"]["min_k"] == MIN_K and m["encoding"] == name
        cache.verify(checksums=True)
        ids, logp, valid = _loaded(cache, data)
        np.testing.assert_array_equal(valid, truncated)
        assert (ids[~valid] == 0).all() and (logp[~valid] == -np.inf).all()
        kept32 = np.where(truncated, logp32, -np.inf)
        if name == "fp32":
            np.testing.assert_array_equal(ids, np.where(truncated, ids32, 0))
            np.testing.assert_array_equal(logp, kept32)
        else:
            exact, got = by_id(np.where(truncated, ids32, 0), kept32), by_id(ids, logp)
            np.testing.assert_array_equal(np.sort(ids, 1), np.sort(np.where(truncated, ids32, 0), 1))
            finite = np.isfinite(exact)
            if name == "fp16":
                assert (np.abs(got[finite] - exact[finite]) <= 2.0**-11 * np.abs(exact[finite]) + 1e-6).all()
            else:  # sqrt(p / p_1) within half a code step
                root, decoded_root = (np.exp((x - x.max(1, keepdims=True)) / 2) for x in (exact, got))
                level = root >= 1 - 0.5 / INT8_LEVELS  # rounds level with the top-1: stored a code below it
                level[np.arange(len(root)), exact.argmax(1)] = False
                bound = np.where(level, 1.0, 0.5) / INT8_LEVELS + 1e-4
                assert (np.abs(decoded_root - root)[finite] <= bound[finite]).all()
        # The stored tail is the exact mass outside the kept ids, as tail_mass computes it.
        stored = pa.concat_tables(cache.iter_tables(["tail_mass"])).column(0).to_numpy()
        expected = targets.tail_mass(torch.from_numpy(kept32), 50, torch.from_numpy(truncated)).numpy()
        np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-7)
        # A loader prefix keeps min(top_k, kept) ids per position.
        _, logp4, valid4 = _loaded(cache, data, top_k=4)
        np.testing.assert_array_equal(valid4, truncated[:, :4])
    # The fidelity probe measures what the top-p cache keeps: it loses more than the full top-16 does.
    probes = {n: c.manifest["fidelity"] for n, c in caches.items()}
    assert probes["fp32"]["kl_mean"] > probes["fixed"]["kl_mean"] > 0
    assert probes["fp32"]["tail_mass_mean"] > probes["fixed"]["tail_mass_mean"]
    assert probes["fp32"]["encoding_kl_mean"] == 0 and 0 < probes["int8"]["encoding_kl_mean"] < 1e-3
    # The fp32 top-p cache is smaller than the fixed one, int8 smaller still.
    sizes = {n: c.manifest["bytes_per_position"] for n, c in caches.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"] < sizes["fixed"]


def test_the_top_k_in_the_graph_is_cut_to_the_same_prefixes(top_p_caches: dict, tmp_path: Path) -> None:
    """--postprocess graph (ONNX's TopK, as on CUDA) writes the top-p cache the host kernel writes: the same key,
    the same kept ids, log-probs within float32 rounding, and the probe of the kept prefix."""
    setup = top_p_caches | {"cache_dir": tmp_path / "graph"}
    key = _cache(CliRunner(), setup, "--top-p", str(P), "--min-k", str(MIN_K), "--postprocess", "graph")
    assert key == top_p_caches["keys"]["fp32"]  # where top-k runs is not part of what the cache holds
    graph, host = open_cache(tmp_path / "graph" / key), top_p_caches["caches"]["fp32"]
    assert graph.manifest["postprocess"] == ["graph"] and host.manifest["postprocess"] == ["host"]
    data = str(top_p_caches["data"])
    (g_ids, g_logp, g_valid), (h_ids, h_logp, h_valid) = _loaded(graph, data), _loaded(host, data)
    np.testing.assert_array_equal(g_valid, h_valid)
    np.testing.assert_array_equal(g_ids, h_ids)
    np.testing.assert_allclose(g_logp[g_valid], h_logp[h_valid], atol=2e-6)
    assert graph.manifest["fidelity"]["kl_mean"] == pytest.approx(host.manifest["fidelity"]["kl_mean"], rel=1e-4)


def test_top_p_1_is_todays_cache(top_p_caches: dict) -> None:
    again = _cache(CliRunner(), top_p_caches, "--top-p", "1.0")
    assert again == top_p_caches["keys"]["fixed"]  # the same key, so the same cache (a hit)
    m = top_p_caches["caches"]["fixed"].manifest
    assert "top_p" not in m["request"] and "top_p" not in m and m["format_version"] == 1


def test_catalog_commands_read_a_top_p_cache(top_p_caches: dict, tmp_path: Path) -> None:
    """`query` (the positions view), `caches show`, `caches verify`, `caches export` and `report`."""
    root, keys, data = str(top_p_caches["cache_dir"]), top_p_caches["keys"], str(top_p_caches["data"])
    runner = CliRunner()
    sql = "SELECT cache_key, topk_ids, topk_logp, tail_mass FROM positions ORDER BY cache_key, id, position"
    got = runner.invoke(main, ["query", sql, "--cache-dir", root, "--format", "json"])
    assert got.exit_code == 0, got.output
    rows = json.loads(got.output)
    for name in ENCODINGS:
        ids, logp, valid = _loaded(top_p_caches["caches"][name], data)
        mine = [r for r in rows if r["cache_key"] == keys[name]]
        assert [len(r["topk_ids"]) for r in mine] == valid.sum(1).tolist()
        assert [r["topk_ids"] for r in mine] == [i[v].tolist() for i, v in zip(ids, valid)]
        np.testing.assert_allclose(np.concatenate([r["topk_logp"] for r in mine]), logp[valid], atol=1e-5)

    shown = runner.invoke(main, ["caches", "show", keys["int8"], "--cache-dir", root])
    assert shown.exit_code == 0, shown.output
    assert f"top-{K} top-p {P:g} (at least {MIN_K}), int8 log-probs" in shown.output
    assert "ids kept (top-p)" in shown.output
    verified = runner.invoke(main, ["caches", "verify", "--cache-dir", root])
    assert verified.exit_code == 0, verified.output

    out = tmp_path / "fp16.parquet"
    exported = runner.invoke(main, ["caches", "export", keys["fp16"], "--cache-dir", root, "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    table = pq.read_table(out)
    ids, logp, valid = _loaded(top_p_caches["caches"]["fp16"], data)
    assert table.column("topk_ids").to_pylist() == [i[v].tolist() for i, v in zip(ids, valid)]  # ragged

    # The trainer streams a top-p cache into its loss, and `report` reads the cache it trained on.
    runs = str(tmp_path / "runs")
    student = ["--student", "causal-lm:layers=1,d_model=16,heads=2", "--epochs", "1", "--no-onnx"]
    trained = runner.invoke(
        main,
        [
            "train-student",
            "--data",
            data,
            "--cache",
            keys["int8"],
            "--cache-dir",
            root,
            *student,
            "--out",
            f"{runs}/tp",
        ],
    )
    assert trained.exit_code == 0, trained.output
    report = runner.invoke(
        main, ["report", "tp", "--out", str(tmp_path / "rep"), "--cache-dir", root, "--runs-dir", runs]
    )
    assert report.exit_code == 0, report.output
    assert f"top-{K} top-p {P:g} (at least {MIN_K}), int8 log-probs" in (tmp_path / "rep" / "report.md").read_text()


def test_a_fixed_k_reader_refuses_a_top_p_cache_by_version(top_p_caches: dict) -> None:
    cache = top_p_caches["caches"]["fp32"]
    edited = {k: v for k, v in cache.manifest.items() if k != MANIFEST_CHECKSUM}
    write_manifest(edited | {"format_version": 1}, cache.path)
    with pytest.raises(CacheError, match="says format_version 1, but top-16 top-p 0.8 .* are version 3"):
        open_cache(cache.path)
    # Without top_p in the manifest (a fixed-k layout) the request, which has it, disagrees.
    fixed = {k: v for k, v in edited.items() if k not in ("top_p", "min_k")}
    write_manifest(fixed | {"format_version": 1}, cache.path)
    with pytest.raises(CacheError, match="says top_p None, but the request .* says 0.8"):
        open_cache(cache.path)


def test_list_sizes_are_checked_per_layout(top_p_caches: dict) -> None:
    fixed, top_p = top_p_caches["caches"]["fixed"], top_p_caches["caches"]["fp16"]
    m = top_p.manifest
    rows = 10
    assert top_p.format.size_problem({"topk_gaps": 20, "topk_logp": 20}, rows, m) == ("", {})
    assert "keeps 2 to 16" in top_p.format.size_problem({"topk_gaps": 19, "topk_logp": 19}, rows, m)[0]
    assert "keeps 2 to 16" in top_p.format.size_problem({"topk_gaps": 161, "topk_logp": 161}, rows, m)[0]
    assert "one length" in top_p.format.size_problem({"topk_gaps": 30, "topk_logp": 31}, rows, m)[0]
    # A fixed-k cache still wants exactly k values per position.
    assert fixed.format.size_problem({}, rows, fixed.manifest)[1] == {
        "topk_ids": (K, f"top_k {K}"),
        "topk_logp": (K, f"top_k {K}"),
    }


def test_a_row_longer_than_top_k_is_refused_on_decode(top_p_caches: dict) -> None:
    cache = top_p_caches["caches"]["fp32"]
    table = next(cache.iter_tables(list(cache.format.columns)))
    lists = pa.array([[1] * (K + 1)] + [[1, 2]] * (table.num_rows - 1), pa.list_(pa.int32()))
    bad = table.set_column(0, "topk_ids", lists)
    with pytest.raises(CacheError, match="holds 17 ids, outside the manifest's top-p range of 2 to 16"):
        cache.format.decode(bad, cache.manifest, 0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "0"], "top_p: 0.0 must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p: 1.5 must be in (0, 1]"),
        (["--top-p", "0.9", "--min-k", "0"], "min_k: 0 must be >= 1"),
        (["--top-p", "0.9", "--min-k", "20"], "min_k: 20 must be <= top_k 16"),
        (["--min-k", "3"], "min_k: 3 applies with top_p < 1"),
        (["--top-p", "0.9", "--target-format", "sampled"], "top_p: applies to top-k targets"),
    ],
)
def test_bad_top_p_options_are_one_line_errors(token_setup: dict, flags: list[str], message: str) -> None:
    got = _invoke(token_setup, "--top-k", str(K), *flags)
    assert got.exit_code == 1 and message in got.output, got.output
    assert "Traceback" not in got.output and not token_setup["cache_dir"].exists()


def test_min_k_above_the_automatic_top_k_is_refused(classifier_setup: dict) -> None:
    got = _invoke(classifier_setup, "--top-p", "0.5", "--min-k", "12")
    assert got.exit_code == 1 and "min_k 12 is more than the 10 ids --top-k 0 chose" in got.output, got.output


def test_a_classifier_trains_on_a_top_p_cache_alone_and_as_an_ensemble_of_itself(classifier_setup: dict) -> None:
    """Vector batches carry the mask too: KD on the cache equals the ensemble of the cache with itself."""
    s = classifier_setup
    config = CacheTeacherConfig(
        teacher=str(s["teacher"]), data=str(s["data"]), cache_dir=str(s["cache_dir"]), top_p=0.6, min_k=2
    )
    cache = open_cache(cache_teacher.run(config, progress=False, log=lambda m: None).path)
    kept = pa.concat_tables(cache.iter_tables(["topk_ids"])).column(0).to_pylist()
    assert cache.top_k == 10 and min(map(len, kept)) == 2 and max(map(len, kept)) > 2
    base = dict(data=str(s["data"]), cache_dir=str(s["cache_dir"]), student="mlp", epochs=1, export_onnx=False)
    quiet = {"progress": False, "log": lambda m: None}
    alone = train_student.run(TrainStudentConfig(out=str(s["cache_dir"] / "kd"), cache=[cache.key], **base), **quiet)
    pair = TrainStudentConfig(out=str(s["cache_dir"] / "ens"), cache=[cache.key] * 2, method="ensemble", **base)
    both = train_student.run(pair, **quiet)
    assert np.isfinite(alone["train_kd"]) and alone["train_kd"] > 0
    assert both["train_kd"] == pytest.approx(alone["train_kd"], rel=1e-6)
