"""Streaming loader: dataset rows paired with their cached targets by id, shuffled in a bounded window.

The unit of work is an example range that lies inside one shard of every cache (the intersection of the
caches' shard boundaries). Units are dealt round-robin to ``rank * num_workers + worker`` slots, so DataLoader
workers (and processes) cover every row exactly once. A worker reads units into a window of at least
``buffer_examples`` examples, checks that the cache's ids equal the dataset's ids row for row, shuffles the
window's examples and yields ready batches. Memory is bounded by the window plus one shard per cache,
whatever the dataset's size. ``labelled_only`` trains on the labelled rows of a dataset whose caches cover every
row (a labelled split followed by an unlabelled transfer set, cached once): pairing is still checked row for row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stages.cache_format import HIDDEN_PREFIX, Cache
from stages.dataset import ID_COLUMN, LOSS_MASK_COLUMN, Dataset, column_to_array, concat_ranges
from stages.errors import CacheError, ConfigError, DatasetError
from stages.formats import flat
from stages.losses import IGNORE_INDEX, SampledTargets, SoftTargets

_UNIT_WITHOUT_CACHE = 4096  # examples per unit when no cache is attached (plain evaluation)


@dataclass
class Batch:
    """One batch. B examples; token-level tensors have a sequence axis S after B.

    inputs:  model inputs by name: ``x`` [B, F] or ``input_ids``/``attention_mask`` [B, S]
    labels:  [B] or [B, S] int64, IGNORE_INDEX where there is none (next-token labels for token caches)
    mask:    [B] or [B, S] bool, the positions that carry targets
    targets: one per cache, SoftTargets (top-k) or SampledTargets, with positions [B] or [B, S] (padding
             positions hold zeros; ``evaluate.flatten`` drops them)
    hidden:  one dict per cache: hidden state name -> [B, D] or [B, S, D] float32, for the names asked for
    ids:     the examples' dataset ids
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor
    targets: list[SoftTargets | SampledTargets]
    hidden: list[dict[str, torch.Tensor]]
    ids: list = field(default_factory=list)

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``; the same object on the CPU, where the loader builds it."""
        if device.type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            {k: move(v) for k, v in self.inputs.items()},
            move(self.labels),
            move(self.mask),
            [t.to(device) for t in self.targets],
            [{k: move(v) for k, v in h.items()} for h in self.hidden],
            self.ids,
        )


@dataclass
class _Block:
    """A window's examples, decoded to numpy. Cache rows of example i are ``row_start[i] : + lengths[i]``."""

    ids: np.ndarray
    inputs: dict[str, object]  # dense [n, ...] arrays or lists of per-example arrays (token inputs)
    labels: np.ndarray
    lengths: np.ndarray
    row_start: np.ndarray
    rows: list[dict[str, np.ndarray]]  # per cache, the arrays the row indices point into


class StreamingLoader(IterableDataset):
    def __init__(
        self,
        data: Dataset,
        caches: list[Cache],
        *,
        input_columns: list[str],
        batch_size: int,
        token_level: bool,
        hidden: list[list[str]] | None = None,
        shuffle: bool = True,
        buffer_examples: int = 8192,
        seed: int = 0,
        pad_token_id: int = 0,
        top_k: int = 0,
        rank: int = 0,
        world_size: int = 1,
        labelled_only: bool = False,
    ):
        missing = [c for c in input_columns if c not in data.columns]
        if missing:
            raise DatasetError(f"dataset {data.path} lacks input column(s) {missing}; it has {data.columns}")
        self.data = data
        self.caches = caches
        self.input_columns = input_columns
        self.batch_size = batch_size
        self.token_level = token_level
        self.hidden = hidden or [[] for _ in caches]
        self.shuffle = shuffle
        self.buffer_examples = buffer_examples
        self.seed = seed
        self.pad_token_id = pad_token_id
        for cache in caches:
            if top_k and cache.format.drawn:
                raise ConfigError(f"top_k {top_k} applies to top-k caches; cache {cache.key} holds sampled targets")
            if top_k > cache.top_k:
                raise ConfigError(
                    f"top_k {top_k} is more than cache {cache.key} holds ({cache.top_k}); use --top-k <= {cache.top_k}"
                )
        self.top_k = (
            top_k  # a prefix of each cache's ids: still exact, since logp is normalised over the full vocabulary
        )
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # batches of the epoch to pass over (set_epoch)
        self.keep = self._labelled_rows() if labelled_only else None  # [rows] bool: the rows that are yielded
        self.units, self.sizes = self._units()  # sizes[i]: examples unit i yields
        self.num_examples = sum(self.sizes)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """A new shuffle order per epoch, the same for every worker (they agree on who reads which unit).

        ``skip``: batches of this epoch already taken (the position a checkpoint saved). The next iteration
        starts right after them: windows wholly before the position are passed over from unit sizes alone,
        reading nothing, with the shuffle generator advanced exactly as if they had been read, so the batches
        that follow are the ones an uninterrupted epoch would have yielded.
        """
        self.epoch = epoch
        self.skip = skip

    def _labelled_rows(self) -> np.ndarray:
        if self.token_level:
            raise ConfigError(
                "labelled_only applies to classifier datasets; token-level rows are labelled by their tokens"
            )
        keep = self.data.labels().is_valid().to_numpy(zero_copy_only=False) if self.data.has_labels else None
        if keep is None or not keep.any():
            raise DatasetError(
                f"labelled_only: dataset {self.data.path} has no labelled rows (no non-null label); "
                "drop --labelled-only or add labels"
            )
        return keep

    def _units(self) -> tuple[list[tuple[int, int]], list[int]]:
        n = self.data.num_rows
        cuts = {0, n}
        for cache in self.caches:
            if cache.shards[-1]["examples"][1] != n:
                raise CacheError(
                    f"cache {cache.path} covers {cache.shards[-1]['examples'][1]} examples; the dataset has {n}"
                )
            cuts |= {s["examples"][0] for s in cache.shards}
        if not self.caches:
            cuts |= set(range(0, n, _UNIT_WITHOUT_CACHE))
        edges = sorted(cuts)
        units = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        if self.keep is None:
            return units, [b - a for a, b in units]
        sizes = [int(self.keep[a:b].sum()) for a, b in units]
        return [u for u, size in zip(units, sizes) if size], [size for size in sizes if size]

    def __len__(self) -> int:
        """Batches per epoch over all workers (an upper bound: each window may end in a short batch)."""
        return -(-self.num_examples // self.batch_size) + len(self.units)

    def count_batches(self, epoch: int, workers: int = 0) -> int:
        """Exactly the batches that epoch yields on this rank over ``workers`` DataLoader workers (0 = in-process).

        Replays ``__iter__``'s unit order and shuffle windows from unit sizes alone, reading nothing.
        """
        return sum(self._slot_batches(epoch, workers))

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))

    def _windows(self, units) -> list[list[int]]:
        """A reader's units (indices) grouped into shuffle windows: each closes once it holds ``buffer_examples``."""
        windows, current, size = [], [], 0
        for unit in units:
            current.append(unit)
            size += self.sizes[unit]
            if size >= self.buffer_examples:
                windows.append(current)
                current, size = [], 0
        return windows + [current] if current else windows

    def _slot_batches(self, epoch: int, workers: int) -> list[int]:
        """Batches each of this rank's reader slots (one per worker, or the process itself) yields in ``epoch``."""
        per_rank = max(workers, 1)
        order = self._order(np.random.default_rng([self.seed, epoch]))
        counts = []
        for worker in range(per_rank):
            mine = order[self.rank * per_rank + worker :: self.world_size * per_rank]
            counts.append(sum(-(-sum(self.sizes[i] for i in w) // self.batch_size) for w in self._windows(mine)))
        return counts

    def _resume_plan(self, workers: int) -> tuple[int, list[int]]:
        """Where ``workers`` DataLoader workers pick up after ``skip`` batches: (rotation, batches to skip per slot).

        A DataLoader takes batches from its workers in turn, from worker 0, passing over a worker once it has
        run dry; so the first ``skip`` batches of the epoch were dealt round-robin over the slots still yielding.
        A restarted DataLoader begins again at worker 0: worker ``w`` reads slot ``(w + rotation) % workers``, so
        that its turn order continues the interrupted one, slot after slot.
        """
        left = self._slot_batches(self.epoch, workers)
        taken = [0] * workers
        remaining, last = min(self.skip, sum(left)), workers - 1
        while remaining:
            for w in range(workers):
                if remaining and taken[w] < left[w]:
                    taken[w], last = taken[w] + 1, w
                    remaining -= 1
        active = [w for w in range(last + 1, last + 1 + workers) if taken[w % workers] < left[w % workers]]
        return (active[0] % workers if active else 0), taken

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        skip = self.skip
        if info:
            rotation, skips = self._resume_plan(workers)
            worker = (worker + rotation) % workers
            skip = skips[worker]
        slots, slot = self.world_size * workers, self.rank * workers + worker
        rng = np.random.default_rng([self.seed, self.epoch])
        mine = self._order(rng)[slot::slots]
        shard_memo: list[dict] = [{} for _ in self.caches]  # one decoded shard per cache at a time
        for window in self._windows(mine):
            examples = sum(self.sizes[i] for i in window)
            batches = -(-examples // self.batch_size)
            if skip >= batches:  # wholly taken before the saved position: advance the shuffle, read nothing
                if self.shuffle:
                    rng.permutation(examples)
                skip -= batches
                continue
            block = _concat([self._read_unit(*self.units[i], shard_memo) for i in window])
            yield from self._batches(block, rng, skip)
            skip = 0

    # -- reading ------------------------------------------------------------------------------------------
    def _read_unit(self, start: int, stop: int, shard_memo: list[dict]) -> _Block:
        label = self.data.label_column if not self.token_level else None
        columns = [ID_COLUMN] + self.input_columns + ([label] if label else [])
        if self.token_level and LOSS_MASK_COLUMN in self.data.columns:
            columns.append(LOSS_MASK_COLUMN)  # carried with the inputs, folded into the batch mask
        table = self.data.read(start, stop, columns)
        ids = table.column(ID_COLUMN).to_numpy()
        inputs = {c: column_to_array(table.column(c), c) for c in columns[1:] if c != label}
        if label:
            labels = table.column(label).cast(pa.int64()).fill_null(IGNORE_INDEX).to_numpy()
        else:
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        rows, lengths, row_start = [], None, None
        for c, cache in enumerate(self.caches):
            arrays, starts, counts = self._shard_rows(c, cache, start, stop, shard_memo[c])
            cache_ids = arrays["id"][starts]
            if len(cache_ids) != len(ids) or not np.array_equal(cache_ids, ids):
                bad = int(np.flatnonzero(cache_ids != ids)[0]) if len(cache_ids) == len(ids) else 0
                raise CacheError(
                    f"cache {cache.path} does not pair with dataset {self.data.path} at row {start + bad}: "
                    f"dataset id {ids[bad]!r}, cache id {cache_ids[bad] if bad < len(cache_ids) else None!r}. "
                    "The cache was built from another dataset or another row order."
                )
            if lengths is not None and not np.array_equal(lengths, counts):
                raise CacheError(
                    f"cache {cache.path} caches different positions than {self.caches[0].path} for rows {start}..{stop}"
                )
            lengths, row_start = counts, starts
            rows.append(arrays)
        if lengths is None:  # no cache: positions are the tokens (or one per example)
            lengths = (
                np.array([len(r) for r in inputs[self.input_columns[0]]])
                if self.token_level
                else np.ones(len(ids), np.int64)
            )
            row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if self.keep is not None:  # after pairing, so a cache of other rows is still refused
            keep = np.flatnonzero(self.keep[start:stop])
            inputs = {c: [v[i] for i in keep] if isinstance(v, list) else v[keep] for c, v in inputs.items()}
            # Cache rows stay whole: row_start keeps pointing into them.
            ids, labels, lengths, row_start = ids[keep], labels[keep], lengths[keep], row_start[keep]
        return _Block(ids, inputs, labels, lengths, row_start, rows)

    def _shard_rows(self, c: int, cache: Cache, start: int, stop: int, memo: dict):
        """The cache rows of examples [start, stop): (arrays, first row per example, rows per example)."""
        shard = next(s for s in cache.shards if s["examples"][0] <= start and stop <= s["examples"][1])
        if memo.get("file") != shard["file"]:
            memo.clear()
            memo.update(file=shard["file"], **self._decode_shard(cache, shard, self.hidden[c], self.top_k))
        first = start - shard["examples"][0]
        starts, counts = memo["starts"][first : first + stop - start], memo["counts"][first : first + stop - start]
        lo, hi = int(starts[0]), int(starts[-1] + counts[-1])
        # Views of the unit's rows only: row indices then agree across caches, whatever their shard layout.
        return {k: v[lo:hi] for k, v in memo["arrays"].items()}, starts - lo, counts

    @staticmethod
    def _decode_shard(cache: Cache, shard: dict, hidden: list[str], top_k: int) -> dict:
        columns = ["id", *cache.format.columns, *(HIDDEN_PREFIX + h for h in hidden)]
        table = cache.read_shard(shard, columns=columns)
        arrays = cache.format.decode(table, cache.manifest, top_k)
        if cache.num_classes and arrays["ids"].size and arrays["ids"].max() >= cache.num_classes:
            # Only a manifest without a checksum can get here: its num_classes is not the teacher's.
            raise CacheError(
                f"cache {cache.path}: shard {shard['file']} holds class id {arrays['ids'].max()}, but the manifest "
                f"says the teacher has {cache.num_classes} classes. Remove the cache (pipeline caches rm "
                f"{cache.path.name}) and run cache-teacher again."
            )
        arrays["id"] = table.column("id").to_numpy()
        for h in hidden:
            arrays[HIDDEN_PREFIX + h] = flat(table.column(HIDDEN_PREFIX + h)).reshape(table.num_rows, -1)
        ids = arrays["id"]
        change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        starts = np.concatenate([[0], change]).astype(np.int64)
        counts = np.diff(np.concatenate([starts, [len(ids)]]))
        expected = shard["examples"][1] - shard["examples"][0]
        if len(starts) != expected:
            raise CacheError(
                f"cache {cache.path}: shard {shard['file']} holds {len(starts)} examples, the manifest says {expected}"
            )
        return {"arrays": arrays, "starts": starts, "counts": counts}

    # -- batching -----------------------------------------------------------------------------------------
    def _batches(self, block: _Block, rng: np.random.Generator, skip: int = 0):
        n = len(block.ids)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        for lo in range(skip * self.batch_size, n, self.batch_size):
            idx = order[lo : lo + self.batch_size]
            yield self._token_batch(block, idx) if self.token_level else self._vector_batch(block, idx)

    def _vector_batch(self, block: _Block, idx: np.ndarray) -> Batch:
        inputs = {}
        for name, col in block.inputs.items():
            if isinstance(col, list):  # token inputs of a sequence classifier: pad to the batch's longest
                rows = [np.asarray(col[i]) for i in idx]
                pad = self.pad_token_id if name == "input_ids" else 0
                arr = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=rows[0].dtype)
                for j, r in enumerate(rows):
                    arr[j, : len(r)] = r
                if name == "input_ids" and "attention_mask" not in block.inputs:
                    inputs["attention_mask"] = torch.from_numpy(
                        (np.arange(arr.shape[1]) < np.array([len(r) for r in rows])[:, None]).astype(np.int64)
                    )
            else:
                arr = col[idx]
            inputs[name] = torch.from_numpy(
                np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype.kind == "f" else arr.dtype)
            )
        rows = block.row_start[idx]
        targets, hidden = self._typed(
            [
                {k: torch.from_numpy(_as_loss_dtype(v[rows])) for k, v in arrays.items() if k != "id"}
                for arrays in block.rows
            ]
        )
        return Batch(
            inputs,
            torch.from_numpy(block.labels[idx]),
            torch.ones(len(idx), dtype=torch.bool),
            targets,
            hidden,
            block.ids[idx].tolist(),
        )

    def _token_batch(self, block: _Block, idx: np.ndarray) -> Batch:
        lengths = block.lengths[idx]
        b, s = len(idx), int(lengths.max())
        tokens = block.inputs.get("input_ids", block.inputs[self.input_columns[0]])
        input_ids = np.full((b, s), self.pad_token_id, dtype=np.int64)
        for j, i in enumerate(idx):
            input_ids[j, : lengths[j]] = np.asarray(tokens[i])[: lengths[j]]
        mask = np.arange(s)[None, :] < lengths[:, None]
        labels = np.full((b, s), IGNORE_INDEX, dtype=np.int64)
        labels[:, :-1] = np.where(mask[:, 1:], input_ids[:, 1:], IGNORE_INDEX)  # next-token labels
        inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        rows = concat_ranges(block.row_start[idx], lengths)
        where = np.nonzero(mask)  # row-major: example by example, position by position, like `rows`
        per_cache = []
        for arrays in block.rows:
            t = {}
            for key, values in arrays.items():
                if key == "id":  # the pairing check's column, not a target
                    continue
                out = np.zeros((b, s) + values.shape[1:], dtype=_as_loss_dtype(values[:0]).dtype)
                out[where] = values[rows]
                t[key] = torch.from_numpy(out)
            per_cache.append(t)
        if LOSS_MASK_COLUMN in block.inputs:
            mask = mask & _shifted_loss_mask(block.inputs[LOSS_MASK_COLUMN], idx, lengths, s)
        targets, hidden = self._typed(per_cache)
        return Batch(inputs, torch.from_numpy(labels), torch.from_numpy(mask), targets, hidden, block.ids[idx].tolist())

    def _typed(
        self, per_cache: list[dict[str, torch.Tensor]]
    ) -> tuple[list[SoftTargets | SampledTargets], list[dict[str, torch.Tensor]]]:
        """Each cache's batch tensors (named as ``_decode_shard`` names them) -> its targets and hidden states."""
        targets, hidden = [], []
        for cache, t in zip(self.caches, per_cache):
            targets.append(cache.format.batch_targets(t, cache.manifest))
            hidden.append({k.removeprefix(HIDDEN_PREFIX): v for k, v in t.items() if k.startswith(HIDDEN_PREFIX)})
        return targets, hidden


def _shifted_loss_mask(loss_mask, idx: np.ndarray, lengths: np.ndarray, s: int) -> np.ndarray:
    """[B, S] bool: position t counts when token t + 1 is a target (``loss_mask`` 1), since t predicts t + 1.

    The last token predicts past the example's end, so it never counts; nor do positions of padding.
    """
    out = np.zeros((len(idx), s), dtype=bool)
    for j, i in enumerate(idx):
        row = np.asarray(loss_mask[i])[: lengths[j]]
        out[j, : len(row) - 1] = row[1:] != 0
    return out


def _as_loss_dtype(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _concat(blocks: list[_Block]) -> _Block:
    if len(blocks) == 1:
        return blocks[0]
    offsets = [0]
    inputs = {}
    for name in blocks[0].inputs:
        cols = [b.inputs[name] for b in blocks]
        inputs[name] = sum((list(c) for c in cols), []) if isinstance(cols[0], list) else np.concatenate(cols)
    rows, row_start = [], []
    for c in range(len(blocks[0].rows)):
        rows.append({k: np.concatenate([b.rows[c][k] for b in blocks]) for k in blocks[0].rows[c]})
    for b in blocks:
        row_start.append(b.row_start + offsets[-1])
        offsets.append(offsets[-1] + (len(b.rows[0]["id"]) if b.rows else int(b.lengths.sum())))
    return _Block(
        np.concatenate([b.ids for b in blocks]),
        inputs,
        np.concatenate([b.labels for b in blocks]),
        np.concatenate([b.lengths for b in blocks]),
        np.concatenate(row_start),
        rows,
    )
