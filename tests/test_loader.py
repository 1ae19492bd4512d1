"""The streaming loader: exact coverage across workers and ranks, pairing by id, token layout."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages import cache_format as fmt
from stages import cache_teacher
from stages.config import CacheTeacherConfig
from stages.dataset import Dataset
from stages.errors import CacheError, ConfigError, DatasetError
from stages.loader import StreamingLoader
from stages.losses import IGNORE_INDEX
from tests import teachers


def _cache(setup: dict, **overrides) -> fmt.Cache:
    config = CacheTeacherConfig(
        teacher=str(setup["teacher"]), data=str(setup["data"]), cache_dir=str(setup["cache_dir"]), **overrides
    )
    return fmt.open_cache(cache_teacher.run(config, progress=False, log=lambda m: None).path)


def _rows_by_id(cache: fmt.Cache) -> dict:
    table = pa.concat_tables(cache.iter_tables())
    out = {}
    for i, pos, ids, logp in zip(*(table.column(c).to_pylist() for c in ("id", "position", "topk_ids", "topk_logp"))):
        out[(i, pos)] = (ids, logp)
    return out


def _loader(setup, caches, **kw) -> StreamingLoader:
    defaults = dict(input_columns=["x"], batch_size=32, token_level=False, buffer_examples=100, seed=0)
    return StreamingLoader(Dataset(setup["data"]), caches, **(defaults | kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_exactly_once_and_paired(classifier_setup, workers) -> None:
    cache = _cache(classifier_setup, top_k=3, shard_size=70)
    expected = _rows_by_id(cache)
    loader = _loader(classifier_setup, [cache])
    source = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=workers) if workers else loader
    seen = Counter()
    for batch in source:
        seen.update(batch.ids)
        for j, i in enumerate(batch.ids):
            ids, logp = expected[(i, 0)]
            assert batch.targets[0].ids[j].tolist() == ids
            assert np.allclose(batch.targets[0].logp[j].numpy(), logp)
            assert np.allclose(batch.inputs["x"][j].numpy(), classifier_setup["x"][i])
            assert batch.labels[j] == i % 10
    assert seen == Counter(range(300))


def test_ranks_split_without_overlap_and_epochs_reshuffle(classifier_setup) -> None:
    cache = _cache(classifier_setup, top_k=3, shard_size=20)
    parts = [list(i for b in _loader(classifier_setup, [cache], rank=r, world_size=3) for i in b.ids) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(300))
    loader = _loader(classifier_setup, [cache])
    first = [i for b in loader for i in b.ids]
    loader.set_epoch(1)
    second = [i for b in loader for i in b.ids]
    assert first != second and sorted(first) == sorted(second)
    assert first == [i for b in _loader(classifier_setup, [cache]) for i in b.ids], "same seed and epoch: same order"


@pytest.mark.parametrize("workers", [0, 2])
def test_count_batches_is_exact(classifier_setup, monkeypatch, workers) -> None:
    """The learning-rate schedule's horizon: batches an epoch really yields, on every rank, shuffled or not.

    Workers are played in-process (``get_worker_info`` answers as worker w of 2 would): the same split as
    DataLoader workers, without forking (``test_every_row_exactly_once_and_paired`` forks real ones).
    """
    cache = _cache(classifier_setup, top_k=3, shard_size=70)
    for kw in (
        {"buffer_examples": 100},
        {"buffer_examples": 45, "batch_size": 16},
        {"shuffle": False, "batch_size": 7},
        {"rank": 1, "world_size": 3, "buffer_examples": 30, "batch_size": 8},
    ):
        loader = _loader(classifier_setup, [cache], **kw)
        for epoch in (0, 3):
            loader.set_epoch(epoch)
            seen = 0
            for worker in range(max(workers, 1)):
                info = SimpleNamespace(num_workers=workers, id=worker) if workers else None
                monkeypatch.setattr("stages.loader.get_worker_info", lambda info=info: info)
                seen += sum(1 for _ in loader)
            assert loader.count_batches(epoch, workers) == seen <= len(loader), kw


def test_two_caches_with_different_shards_pair(classifier_setup) -> None:
    a = _cache(classifier_setup, top_k=3, shard_size=70)
    b = _cache(classifier_setup, top_k=5, shard_size=45)
    rows_a, rows_b = _rows_by_id(a), _rows_by_id(b)
    n = 0
    for batch in _loader(classifier_setup, [a, b]):
        for j, i in enumerate(batch.ids):
            assert batch.targets[0].ids[j].tolist() == rows_a[(i, 0)][0]
            assert batch.targets[1].ids[j].tolist() == rows_b[(i, 0)][0]
            n += 1
    assert n == 300


def test_token_batches_place_targets_at_their_positions(token_setup) -> None:
    cache = _cache(token_setup, top_k=4, shard_size=8)
    expected = _rows_by_id(cache)
    seqs = token_setup["seqs"]
    loader = StreamingLoader(
        Dataset(token_setup["data"]),
        [cache],
        input_columns=["input_ids"],
        batch_size=6,
        token_level=True,
        buffer_examples=10,
    )
    count = 0
    for batch in loader:
        for j, i in enumerate(batch.ids):
            n = len(seqs[i])
            assert batch.mask[j].tolist() == [True] * n + [False] * (batch.mask.shape[1] - n)
            assert batch.inputs["input_ids"][j, :n].tolist() == seqs[i].tolist()
            assert batch.labels[j, : n - 1].tolist() == seqs[i][1:].tolist()
            assert (batch.labels[j, n - 1 :] == IGNORE_INDEX).all()
            for t in range(n):
                assert batch.targets[0].ids[j, t].tolist() == expected[(i, t)][0]
            count += 1
    assert count == len(seqs)


def test_cache_of_other_rows_is_refused(classifier_setup, tmp_path) -> None:
    cache = _cache(classifier_setup, top_k=3)
    shuffled = teachers.write_vectors(
        tmp_path / "other.parquet", classifier_setup["x"], ids=np.arange(300)[::-1].copy()
    )
    loader = StreamingLoader(Dataset(shuffled), [cache], input_columns=["x"], batch_size=32, token_level=False)
    with pytest.raises(CacheError, match="does not pair"):
        next(iter(loader))


def test_top_k_prefix_of_a_wider_cache_equals_the_narrow_cache(classifier_setup) -> None:
    wide = _cache(classifier_setup, top_k=6)
    narrow = _cache(classifier_setup, top_k=2)
    a = next(iter(_loader(classifier_setup, [wide], shuffle=False, top_k=2)))
    b = next(iter(_loader(classifier_setup, [narrow], shuffle=False)))
    assert torch.equal(a.targets[0].ids, b.targets[0].ids)
    assert torch.equal(a.targets[0].logp, b.targets[0].logp)
    with pytest.raises(Exception, match="top_k 7 is more than"):
        _loader(classifier_setup, [wide], top_k=7)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_yields_exactly_the_rest(classifier_setup, monkeypatch, workers) -> None:
    """A position (epoch, batches taken) gives the rest of the uninterrupted epoch, reading only what is left."""
    cache = _cache(classifier_setup, top_k=3, shard_size=70)
    loader = _loader(classifier_setup, [cache], batch_size=16, buffer_examples=100)

    def epoch_ids(skip: int) -> list[list]:
        loader.set_epoch(3, skip)
        source = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=workers) if workers else loader
        return [batch.ids for batch in source]

    full = epoch_ids(0)
    assert len(full) == loader.count_batches(3, workers)
    for skip in (1, 5, 7, len(full) - 1, len(full)):  # inside a window, at a window's edge, the very end
        assert epoch_ids(skip) == full[skip:], skip
    if not workers:  # windows wholly before the position are not read at all
        reads = []
        monkeypatch.setattr(loader, "_read_unit", lambda *a, _f=loader._read_unit: reads.append(a[:2]) or _f(*a))
        epoch_ids(len(full) - 1)
        assert 0 < sum(stop - start for start, stop in reads) < 300


def test_labelled_only_yields_each_labelled_row_once_paired_with_a_cache_of_every_row(
    classifier_setup, tmp_path
) -> None:
    """A labelled split plus unlabelled transfer rows, cached once: training on the labelled rows alone."""
    labels = [i % 10 if i % 3 == 0 else None for i in range(300)]
    setup = classifier_setup | {
        "data": teachers.write_vectors(tmp_path / "partial.parquet", classifier_setup["x"], labels)
    }
    cache = _cache(setup, top_k=3, shard_size=70)
    expected = _rows_by_id(cache)
    for kw in ({}, {"buffer_examples": 45, "batch_size": 16}, {"shuffle": False, "batch_size": 7}):
        loader = _loader(setup, [cache], labelled_only=True, **kw)
        loader.set_epoch(2)
        batches = list(loader)
        seen = Counter(i for b in batches for i in b.ids)
        assert seen == Counter(range(0, 300, 3)), kw
        assert loader.num_examples == 100 and loader.count_batches(2) == len(batches) <= len(loader), kw
        for batch in batches:
            for j, i in enumerate(batch.ids):
                assert batch.targets[0].ids[j].tolist() == expected[(i, 0)][0]
                assert np.allclose(batch.inputs["x"][j].numpy(), classifier_setup["x"][i])
                assert batch.labels[j] == i % 10
    ranks = [
        [i for b in _loader(setup, [cache], labelled_only=True, rank=r, world_size=3) for i in b.ids] for r in range(3)
    ]
    assert sorted(sum(ranks, [])) == list(range(0, 300, 3))
    resumable = _loader(setup, [cache], labelled_only=True, buffer_examples=45, batch_size=8)  # windows by kept rows
    resumable.set_epoch(4)
    full = [b.ids for b in resumable]
    for skip in (1, 4, len(full) - 1):
        resumable.set_epoch(4, skip)
        assert [b.ids for b in resumable] == full[skip:], skip


def test_labelled_only_needs_labelled_classifier_rows(classifier_setup, token_setup, tmp_path) -> None:
    unlabelled = teachers.write_vectors(tmp_path / "transfer.parquet", classifier_setup["x"])
    with pytest.raises(DatasetError, match="no labelled rows"):
        StreamingLoader(
            Dataset(unlabelled), [], input_columns=["x"], batch_size=8, token_level=False, labelled_only=True
        )
    with pytest.raises(ConfigError, match="classifier datasets"):
        StreamingLoader(
            Dataset(token_setup["data"]),
            [],
            input_columns=["input_ids"],
            batch_size=8,
            token_level=True,
            labelled_only=True,
        )
