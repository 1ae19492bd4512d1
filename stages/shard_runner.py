"""One shard of stage one: batch the dataset rows, run the teacher, reduce its outputs to cached targets,
and assemble the shard's Arrow table with one row per position, in dataset order."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from stages import cache_format as fmt
from stages import targets
from stages.config import CacheTeacherConfig
from stages.dataset import ID_COLUMN, Dataset, column_to_array, concat_ranges
from stages.errors import DatasetError, TeacherError
from stages.formats import by_id, config_format, fixed_list
from stages.teacher import CLASSIFIER, Teacher, generated_input, is_past, is_static

# A log-partition beyond this is no teacher's: float32 logits that large lose every digit of their differences
# (at 3e38 two logits 1e38 apart sum to probability 2), so the cache would hold wrong probabilities.
_HUGE_LOGZ = 1e30

# Sampled draws (and logits that are not float32, for the kernel) copy their rows in blocks, so memory does not
# grow with batch x V; smaller blocks pay torch's per-call overhead (2x the CPU time at 4 MiB than at 16 MiB).
_DENSE_BLOCK_BYTES = 16 << 20


class ShardRunner:
    """Runs the teacher over one shard's rows and builds the shard's Arrow table (rows in dataset order)."""

    def __init__(self, teacher: Teacher, dataset: Dataset, config: CacheTeacherConfig, kind: str):
        self.teacher = teacher
        self.dataset = dataset
        self.config = config
        self.kind = kind
        self.num_classes: int | None = teacher.info.num_classes
        self.hidden_shapes: dict[str, list[int]] = {}
        self.probe_left = config.probe_positions
        # A graph exported without a dynamic batch axis takes exactly that many rows a call: batches are that
        # size, and a last, shorter one is filled up with copies of its last row whose outputs are dropped.
        batched = [i for i in teacher.info.inputs if i.shape and i.name != "use_cache_branch" and not is_past(i.name)]
        fixed = {i.shape[0] for i in batched if is_static(i.shape[0])}
        self.fixed_batch: int | None = fixed.pop() if len(fixed) == 1 else None
        self._fill = {i.name for i in batched if i.shape[0] == self.fixed_batch}
        self.batch_size = self.fixed_batch or config.batch_size
        # Without an attention_mask input the teacher sees padding as tokens (a bidirectional or pooling
        # teacher's outputs then change with the batch): such teachers get batches of equal length only.
        self.equal_lengths = "attention_mask" not in teacher.input_names
        self.probe_stats: dict[str, list[float]] = {
            k: [] for k in ("kl", "entropy", "top1", "tail", "enc_kl", "enc_dlogp")
        }
        names = teacher.input_names
        self.columns = [ID_COLUMN] + [n for n in names if n in dataset.columns]
        self.format = config_format(config)
        self.schema = fmt.shard_schema(dataset.schema.field(ID_COLUMN).type, teacher.info.hidden, self.format)

    def run(self, start: int, stop: int, bar: tqdm) -> tuple[pa.Table, dict | None]:
        self.start = start  # sampled targets key their draws by global row index
        table = self.dataset.read(start, stop, self.columns)
        ids = table.column(ID_COLUMN).combine_chunks()
        arrays = {c: column_to_array(table.column(c), c) for c in self.columns[1:]}
        pieces: list[tuple[np.ndarray, dict]] = []  # (example indices, outputs) per batch
        self._check_inputs(arrays, ids)
        for batch_idx, feeds, mask in self._batches(arrays, len(ids)):
            # No name holds the outputs past their batch: ORT's arena then reuses the logits' buffer for the
            # next call instead of allocating a second one (the bare session's own peak).
            if self.fixed_batch and len(batch_idx) < self.fixed_batch:
                outs = self._run_padded(feeds, len(batch_idx))
            else:
                outs = self.teacher.run(feeds, dense_logits=self.probe_left > 0)
            pieces.append((batch_idx, self._postprocess(outs, mask, ids, batch_idx)))
            del outs
            bar.update(len(batch_idx))
        return self._assemble(ids, pieces), self._probe_summary()

    # -- batching ---------------------------------------------------------------------------------------
    def _positions_per_call(self) -> int:
        """The most positions (rows x padded length) one teacher call may hold: the logits budget over 4 V bytes.

        Until the vocabulary is known (a dynamic vocabulary axis), one row: the first call's logits reveal it.
        """
        if self.num_classes is None:
            return 1
        return max(1, (self.config.logits_budget_mb << 20) // (4 * self.num_classes))

    def _batches(self, arrays: dict, n: int):
        """Yield (example indices, feeds, position mask or None). Token batches group similar lengths.

        A batch holds at most batch_size rows and, padding included, at most _positions_per_call() positions
        (at least one row). Batches are made lazily, after the previous one was post-processed.
        """
        bs = self.batch_size
        inputs = {i.name: i for i in self.teacher.info.inputs}
        ragged = any(isinstance(arrays[name], list) for name in arrays)
        if self.kind == CLASSIFIER and not ragged and all(name in arrays for name in inputs):
            lo = 0
            while lo < n:
                idx = np.arange(lo, min(lo + min(bs, self._positions_per_call()), n))
                feeds = {}
                for name, inp in inputs.items():
                    feeds[name] = self._fixed(arrays[name], idx, inp)
                yield idx, feeds, None
                lo = int(idx[-1]) + 1
            return
        # Token inputs: a token-level teacher, or a sequence classifier (one distribution per example, no mask).
        lead = "input_ids" if "input_ids" in arrays else next(iter(arrays))
        lengths = np.array([len(r) for r in arrays[lead]])
        if (lengths == 0).any():
            bad = int(np.flatnonzero(lengths == 0)[0])
            raise DatasetError(f"row {bad} of the shard has an empty '{lead}'; every sequence needs at least one token")
        order = np.argsort(lengths, kind="stable")  # length grouping: little padding, fewer wasted positions
        lo = 0
        while lo < n:
            # Ascending lengths: c rows take c x (length of the c-th) positions, which grows with c.
            widths = lengths[order[lo : lo + bs]]
            fits = np.arange(1, len(widths) + 1) * widths <= self._positions_per_call()
            if self.equal_lengths:
                fits &= widths == widths[0]
            idx = np.sort(order[lo : lo + max(1, int(fits.sum()))])
            lo += len(idx)
            width = int(lengths[idx].max())
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for j, i in enumerate(idx):
                mask[j, : lengths[i]] = 1
            if "attention_mask" in arrays:
                mask = self._padded(arrays["attention_mask"], idx, width, 0, np.int64)
            feeds = {}
            for name, inp in inputs.items():
                if name in arrays:
                    pad = self.config.pad_token_id if name == "input_ids" else 0
                    feeds[name] = self._padded(arrays[name], idx, width, pad, inp.dtype)
                else:
                    feeds[name] = generated_input(inp, mask)
            yield idx, feeds, (mask.astype(bool) if self.kind != CLASSIFIER else None)

    def _run_padded(self, feeds: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        """A last batch of ``rows`` < the teacher's fixed batch: filled up with copies of its last row; the
        outputs of the copies are dropped."""
        fill = self.fixed_batch - rows
        full = {
            name: np.concatenate([a, np.repeat(a[-1:], fill, axis=0)]) if name in self._fill else a
            for name, a in feeds.items()
        }
        return [o[:rows] for o in self.teacher.run(full, dense_logits=self.probe_left > 0)]

    def _check_inputs(self, arrays: dict, ids: pa.Array) -> None:
        """Refuse what the teacher would take without complaint and get wrong: rows of another length than a
        fixed axis, fractional values for an integer input, negative token ids, an attention mask that does not
        match its tokens."""

        def row(i: int) -> str:
            return f"row {self.start + i} (id {ids[i].as_py()!r})"

        for inp in self.teacher.info.inputs:
            column = arrays.get(inp.name)
            if column is None:
                continue
            fixed = inp.shape[1] if len(inp.shape) == 2 and is_static(inp.shape[1]) else None
            wrong = self._first_of_other_length(column, fixed) if fixed else None
            if wrong is not None:
                bad, length = wrong
                raise DatasetError(
                    f"{row(bad)}: column '{inp.name}' holds {length} values, but the teacher's input "
                    f"'{inp.name}' is {list(inp.shape)}; give every row {inp.shape[1]} values, or re-export the "
                    "teacher with that axis dynamic"
                )
            if not np.issubdtype(inp.dtype, np.integer):
                continue
            flat = np.concatenate([np.ravel(r) for r in column]) if isinstance(column, list) else column
            if not np.issubdtype(flat.dtype, np.number):
                continue
            whole = np.isfinite(flat) & (flat == np.round(flat)) if np.issubdtype(flat.dtype, np.floating) else None
            if whole is not None and not whole.all():
                bad = flat[~whole][0].item()
                raise DatasetError(
                    f"column '{inp.name}' holds {bad!r}, but the teacher's input '{inp.name}' takes whole numbers "
                    f"({np.dtype(inp.dtype).name}); store integers (an integer column)"
                )
            if inp.name == "input_ids" and flat.size and flat.min() < 0:
                raise DatasetError(
                    f"column 'input_ids' holds the negative token id {flat.min().item()}; token ids are >= 0 (the "
                    "pipeline pads and masks sequences itself: store each one unpadded)"
                )
        mask, tokens = arrays.get("attention_mask"), arrays.get("input_ids")
        if mask is None or tokens is None:
            return
        for i in range(len(tokens)):
            m = np.ravel(mask[i])
            real = int(m.sum()) if np.isin(m, (0, 1)).all() else -1
            if len(m) != len(tokens[i]) or real < 1 or not m[:real].all():
                raise DatasetError(
                    f"{row(i)}: its attention_mask {m[:12].tolist()}{'...' if len(m) > 12 else ''} is not "
                    f"{len(tokens[i])} values of 1s then 0s (at least one 1) for its {len(tokens[i])} tokens; the "
                    "cache numbers the real tokens 0, 1, ... from the left. Store sequences unpadded and without "
                    "an attention_mask column (the pipeline pads and masks them itself), or right-padded"
                )

    def _first_of_other_length(self, column, width: int) -> tuple[int, int] | None:
        """(row, its length) of the first row of ``column`` whose length is not ``width``; None when all have it."""
        if isinstance(column, list):
            return next(((i, len(r)) for i, r in enumerate(column) if len(r) != width), None)
        # One length for all rows; a classifier's dense rows get _fixed's own check of their whole shape.
        if column.ndim == 2 and self.kind != CLASSIFIER and len(column) and column.shape[1] != width:
            return 0, column.shape[1]
        return None

    @staticmethod
    def _fixed(column, idx: np.ndarray, inp) -> np.ndarray:
        if isinstance(column, list):
            shapes = {column[i].shape for i in idx}
            if len(shapes) > 1:
                raise DatasetError(
                    f"column '{inp.name}' has rows of different shapes {sorted(shapes)[:3]}; "
                    "a classifier input needs one shape"
                )
            batch = np.stack([column[i] for i in idx])
        else:
            batch = column[idx]
        expected = tuple(d if is_static(d) else None for d in inp.shape[1:])
        got = batch.shape[1:]
        if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
            raise DatasetError(
                f"column '{inp.name}' has rows of shape {list(got)} "
                f"but the teacher expects {list(inp.shape[1:])} per example"
            )
        return batch.astype(inp.dtype, copy=False)

    @staticmethod
    def _padded(column, idx: np.ndarray, width: int, pad: int, dtype) -> np.ndarray:
        out = np.full((len(idx), width), pad, dtype=dtype)
        for j, i in enumerate(idx):
            row = np.asarray(column[i])
            out[j, : len(row)] = row
        return out

    # -- targets ----------------------------------------------------------------------------------------
    def _postprocess(self, outs: list[np.ndarray], mask: np.ndarray | None, ids: pa.Array, idx: np.ndarray) -> dict:
        sampled = self.format.drawn
        # Sampled targets still take the top-1 and logZ: they check the logits.
        k, temperature = 1 if sampled else self.config.top_k, float(self.config.temperature)
        n_main, n_hidden = (3 if self.teacher.topk_in_graph else 1), len(self.teacher.info.hidden)
        main, hidden, extra = outs[:n_main], outs[n_main : n_main + n_hidden], outs[n_main + n_hidden :]
        if mask is not None and main[0].shape[:2] != mask.shape:
            raise TeacherError(
                f"the teacher's output '{self.teacher.info.logits_output}' came out {list(main[0].shape)} for "
                f"{mask.shape[0]} sequence(s) of {mask.shape[1]} tokens: token-level logits must be [batch, seq, "
                "vocab] over the input tokens. A classifier: export its logits as [batch, classes]; or choose "
                "another output with --logits-output"
            )
        keep = None if mask is None else mask.reshape(-1)
        # [B, S, ...] per-position outputs -> the real positions' rows.
        select = (lambda a: a.reshape(-1, *a.shape[2:])[keep]) if keep is not None else (lambda a: a)
        result = {} if mask is None else {"counts": mask.sum(1)}
        for name, h in zip(self.teacher.info.hidden, hidden):
            if mask is not None and h.shape[:2] != mask.shape:
                raise TeacherError(
                    f"hidden tensor '{name}' has shape {list(h.shape)}; "
                    "a token-level teacher's hidden states must be [batch, seq, ...]"
                )
            per_row = list(h.shape[2:] if mask is not None else h.shape[1:])
            self.hidden_shapes.setdefault(name, per_row)
            h = select(h)
            result[fmt.HIDDEN_PREFIX + name] = h.reshape(h.shape[0], -1).astype(np.float16)

        dense = extra[0] if extra else (None if self.teacher.topk_in_graph else main[0])  # the full logits [.., V]
        # Flat [positions, V] view of the logits, padding included (no copy), and the real positions' rows in it.
        flat = None if dense is None else torch.from_numpy(dense).reshape(-1, dense.shape[-1])
        real = (
            None
            if flat is None
            else torch.from_numpy(np.flatnonzero(keep) if keep is not None else np.arange(len(flat)))
        )
        if flat is not None and self.num_classes is None:
            self.num_classes = flat.shape[-1]
        drawn = counts = None
        if sampled:
            uniforms = torch.from_numpy(self._uniforms(idx, mask))
            draws = [targets.sample_counts(z, temperature, uniforms[at]) for at, z in _dense_blocks(flat, real)]
            drawn, counts = (torch.cat(parts) for parts in zip(*draws))
            result |= {"sample_ids": drawn.to(torch.int32).numpy(), "sample_counts": counts.to(torch.int16).numpy()}
        if self.teacher.topk_in_graph:
            top_ids, logp, logz = (select(a) for a in main)
            if self.num_classes is None:
                raise TeacherError(
                    "in-graph top-k needs a teacher whose vocabulary axis is fixed; use --postprocess host"
                )
        else:
            vocab = flat.shape[-1]
            if k > vocab:
                unseen = (
                    " (its graph leaves that axis dynamic: it showed only now, at the first batch)"
                    if self.teacher.info.num_classes is None
                    else ""
                )
                raise TeacherError(
                    f"top_k {k} is larger than the teacher's vocabulary of {vocab}{unseen}; use --top-k <= {vocab}"
                )
            # One read of each real position's logits (topk_kernel): padding rows are skipped, nothing is copied.
            top_ids, logp, logz = _kernel_topk(flat, real, k, temperature)
        # numpy from here: torch's thread pool costs more than these [positions, k] sums (measured 30 ms a call).
        full_k = top_ids, logp  # the probe measures the top-k as computed, then what the cache keeps of it
        top_ids, logp, valid = self._top_p(top_ids, logp)
        tail = targets.tail_mass_array(logp, self.num_classes, valid)
        if self.probe_left > 0:
            self._probe(flat, real[: self.probe_left], *full_k, top_ids, logp, valid, tail, drawn, counts)
        bad = ~np.isfinite(logz) | np.isnan(full_k[1]).any(-1)
        if bad.any():
            raise TeacherError(self._nonfinite_message(bad, mask, ids, idx))
        huge = np.abs(logz) > _HUGE_LOGZ
        if huge.any():
            raise TeacherError(
                self._nonfinite_message(
                    huge, mask, ids, idx, f"logits / T beyond {_HUGE_LOGZ:g}, where float32 no longer resolves them"
                )
            )
        if not sampled:
            if valid is not None:
                result["kept"] = valid.sum(-1)
            result |= {"ids": top_ids.astype(np.int32), "logp": logp, "logz": logz, "tail": tail}
        return result

    def _top_p(self, ids: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A top-p cache's prefix of each position's top-k: (ids, logp, valid [N, k] bool), the slots after the
        prefix made padding (id 0, log-prob -inf); a fixed-k cache's top-k unchanged, with valid None."""
        if self.format.drawn or not self.format.ragged:  # sampled formats have no prefix to cut
            return ids, logp, None
        kept = targets.top_p_lengths(torch.from_numpy(logp), self.config.top_p, self.config.min_k).numpy()
        valid = np.arange(ids.shape[-1]) < kept[:, None]
        return np.where(valid, ids, 0), np.where(valid, logp, -math.inf).astype(np.float32), valid

    def _uniforms(self, idx: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """One uniform per draw, keyed by (global row, position): independent of batching and resume."""
        rows = self.start + idx
        if mask is None:
            keys = rows.astype(np.uint64) << np.uint64(24)
        else:
            position = np.cumsum(mask, axis=1) - 1
            keys = (np.repeat(rows, mask.sum(1)).astype(np.uint64) << np.uint64(24)) + position[mask].astype(np.uint64)
        return targets.hashed_uniforms(keys, self.config.samples, self.config.sample_seed)

    def _probe(self, flat: torch.Tensor, rows: torch.Tensor, top_ids, top_logp, ids, logp, valid, tail, drawn, counts):
        """Dense statistics on the first positions: what the cache loses (KL), entropy, confidence.

        The batch's arrays for its real positions, whose first ``len(rows)`` these are: ``top_ids``/``top_logp``
        the top-k as computed; ``ids``, ``logp``, ``valid``, ``tail`` what the cache keeps of it (a top-p cache's
        prefix, padded). With sampled targets (``drawn``, ``counts`` of these rows; the top-k is their top-1)
        the tail is the teacher's mass outside the distinct ids drawn, and there is no KL.
        """
        T, n = float(self.config.temperature), len(rows)
        ids, logp, tail, top_logp = ids[:n], logp[:n], tail[:n], top_logp[:n]
        valid = None if valid is None else valid[:n]
        if drawn is None:
            kept = None if valid is None else valid.sum(-1)
            entropy, kl = _kernel_statistics(flat, rows, T, top_ids[:n], tail, kept)
            self.probe_stats["kl"] += kl.tolist()
            self.probe_stats["entropy"] += entropy.tolist()
            self.probe_stats["tail"] += tail.tolist()
            self._probe_encoding(ids.astype(np.int32), logp, tail, valid)
        else:
            for at, z in _dense_blocks(flat, rows):
                covered = torch.log_softmax(z.double() / T, -1).gather(1, drawn[at]).exp() * (counts[at] > 0)
                self.probe_stats["tail"] += (1 - covered.sum(-1).float()).tolist()
                self.probe_stats["entropy"] += targets.entropy(z, T).tolist()
        self.probe_stats["top1"] += np.exp(top_logp[:, 0]).tolist()
        self.probe_left -= n

    def _probe_encoding(self, ids: np.ndarray, logp: np.ndarray, tail: np.ndarray, valid: np.ndarray | None) -> None:
        """What the encoding loses: KL from the exact top-k + tail to the decoded top-k + the same (exact) tail,
        and the largest |delta log p| over the ids the teacher gives any probability (matched by id: an encoding
        may order ids of equal decoded probability otherwise; a top-p cache's padding, id 0 at -inf, sorts after
        a kept id 0 in both)."""
        decoded_ids, decoded = self.format.unpack(self.format.pack(ids, logp, valid), tail, valid)
        exact, decoded = by_id(ids, logp), by_id(decoded_ids, decoded)
        p = np.exp(exact)
        with np.errstate(invalid="ignore"):  # -inf - -inf at padding: NaN, dropped by the where
            diff = np.where(p > 0, exact - decoded, 0.0)  # an id of probability 0 adds nothing to the KL
        self.probe_stats["enc_kl"] += (p * diff).sum(1).tolist()
        self.probe_stats["enc_dlogp"] += np.abs(diff).max(1, initial=0.0).tolist()

    def _probe_summary(self) -> dict | None:
        """Summarise the probe once, from the first shard this run computes; later shards take none.

        tail_mass_mean is the teacher's mass outside the cached ids (top-k) or the distinct drawn ids (sampled).
        """
        if not self.probe_stats["entropy"]:
            return None
        s = {k: np.asarray(v) for k, v in self.probe_stats.items()}
        self.probe_stats = {k: [] for k in self.probe_stats}
        self.probe_left = 0
        summary = {
            "positions": int(len(s["entropy"])),
            "entropy_mean": float(s["entropy"].mean()),
            "top1_prob_mean": float(s["top1"].mean()),
            "tail_mass_mean": float(s["tail"].mean()),
        }
        if len(s["kl"]):
            summary |= {"kl_mean": float(s["kl"].mean()), "kl_max": float(s["kl"].max())}
        if len(s["enc_kl"]):
            summary |= {
                "encoding": self.format.encoding,
                "encoding_kl_mean": float(s["enc_kl"].mean()),
                "encoding_kl_max": float(s["enc_kl"].max()),
                "encoding_max_abs_dlogp": float(s["enc_dlogp"].max()),
            }
        return summary

    @staticmethod
    def _nonfinite_message(
        bad: np.ndarray, mask, ids: pa.Array, idx: np.ndarray, what: str = "NaN or infinite logits"
    ) -> str:
        first = int(np.flatnonzero(bad)[0])
        if mask is not None:
            example = int(np.repeat(np.arange(len(idx)), mask.sum(1))[first])
        else:
            example = first
        return (
            f"the teacher produced {what} for id {ids[int(idx[example])].as_py()} "
            f"({int(bad.sum())} position(s) in this batch). "
            "Check the model and its input values; nothing was cached for this shard."
        )

    def _assemble(self, ids: pa.Array, pieces: list[tuple[np.ndarray, dict]]) -> pa.Table:
        """Concatenate batches back into dataset order: one row per position."""
        n = len(ids)
        counts = np.ones(n, dtype=np.int64)
        for idx, res in pieces:
            if "counts" in res:
                counts[idx] = res["counts"]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(offsets[-1])
        out: dict[str, np.ndarray] = {}
        for idx, res in pieces:
            rows = concat_ranges(offsets[idx], counts[idx])  # where this batch's positions go in dataset order
            for name, arr in res.items():
                if name == "counts":
                    continue
                if name not in out:
                    out[name] = np.empty((total,) + arr.shape[1:], dtype=arr.dtype)
                out[name][rows] = arr
        example_of_row = np.repeat(np.arange(n), counts)
        columns = {
            "id": ids.take(pa.array(example_of_row)),
            "position": pa.array((np.arange(total) - offsets[example_of_row]).astype(np.int32)),
        }
        columns |= self.format.shard_columns(out, self.config)
        for h in self.teacher.info.hidden:
            columns[fmt.HIDDEN_PREFIX + h] = fixed_list(out[fmt.HIDDEN_PREFIX + h], out[fmt.HIDDEN_PREFIX + h].shape[1])
        return pa.table(columns, schema=self.schema)


def _dense_blocks(flat: torch.Tensor, rows: torch.Tensor):
    """Yield (slice of ``rows``, float32 copy of those rows of ``flat``), _DENSE_BLOCK_BYTES of logits at a time."""
    step = max(1, _DENSE_BLOCK_BYTES // (4 * flat.shape[-1]))
    for lo in range(0, max(len(rows), 1), step):  # one empty block when there are no rows: empty results, not none
        at = slice(lo, min(lo + step, len(rows)))
        yield at, flat.index_select(0, rows[at]).float()


def _float32_blocks(flat: torch.Tensor, rows: torch.Tensor):
    """Yield (slice of ``rows``, float32 [N, V] array, row indices into it) covering ``rows``: float32 logits are
    read where they lie (one block); other dtypes are converted _DENSE_BLOCK_BYTES at a time."""
    if flat.dtype == torch.float32 and flat.is_contiguous():
        yield slice(0, len(rows)), flat.numpy(), rows.numpy()
        return
    for at, z in _dense_blocks(flat, rows):
        yield at, z.contiguous().numpy(), np.arange(len(z))


def _by_blocks(compute, flat: torch.Tensor, rows: torch.Tensor) -> list[np.ndarray]:
    """``compute(logits, their row indices, slice of rows)`` over ``_float32_blocks``, its arrays concatenated."""
    parts = [compute(z, at_rows, at) for at, z, at_rows in _float32_blocks(flat, rows)]
    return [np.concatenate(p) for p in zip(*parts)] if len(parts) > 1 else list(parts[0])


def _kernel_topk(flat: torch.Tensor, rows: torch.Tensor, k: int, temperature: float) -> list[np.ndarray]:
    """topk_kernel.topk_log_probs over the given rows of the flat logits, whatever their float dtype."""
    from stages import topk_kernel  # numba: imported by cache-teacher's warm-up thread, not by every command

    return _by_blocks(lambda z, at_rows, _: topk_kernel.topk_log_probs(z, at_rows, k, temperature), flat, rows)


def _kernel_statistics(flat: torch.Tensor, rows: torch.Tensor, temperature: float, ids, tail, kept) -> list[np.ndarray]:
    """topk_kernel.dense_statistics (entropy, KL) of the given rows, whatever the logits' float dtype."""
    from stages import topk_kernel

    def compute(z, at_rows, at):
        return topk_kernel.dense_statistics(
            z, at_rows, temperature, ids[at], tail[at], None if kept is None else kept[at]
        )

    return _by_blocks(compute, flat, rows)
