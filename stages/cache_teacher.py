"""Stage one: run a teacher once over a dataset and cache its exact top-k soft targets.

``run(config)`` is the whole stage: resolve the content key, return at once on a cache hit, otherwise resume
after the last complete shard, run the teacher shard by shard (writing each shard atomically and journalling
it), and write the manifest last.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.config import CacheTeacherConfig, to_dict
from pipeline.errors import CacheError, DatasetError, TeacherError
from stages import cache_format as fmt
from stages import targets
from stages.dataset import ID_COLUMN, Dataset, column_to_array
from stages.teacher import CLASSIFIER, TOKEN, Teacher, TeacherInfo, check_hidden, inspect

_DEFAULT_SHARD = {CLASSIFIER: 16_384, TOKEN: 512}  # examples per shard: the unit of resume
_AUTO_K = 32  # top_k when none is given and the vocabulary is large or unknown
REQUEST = "request.json"
_LOCK = ".lock"


@dataclass
class CacheResult:
    path: Path
    hit: bool
    manifest: dict


def request_for(info: TeacherInfo, fingerprint: str, config: CacheTeacherConfig) -> dict:
    """Everything that determines the cached content, and nothing that does not (batch size, device, threads)."""
    return {
        "target_format": "topk",
        "teacher_sha256": info.sha256,
        "logits_output": info.logits_output,
        "dataset_fingerprint": fingerprint,
        "top_k": config.top_k,
        "temperature": float(config.temperature),
        "hidden": sorted(config.hidden),
    }


def run(config: CacheTeacherConfig, progress: bool = True, log=print) -> CacheResult:
    dataset = Dataset(config.data)
    dataset.check_unique_ids()
    info, model, _ = inspect(config.teacher, config.logits_output or None)
    check_hidden(model, config.hidden)
    if config.top_k == 0:  # auto: every class of a small classifier (exact), else a 32-wide top-k
        config = dataclasses.replace(config, top_k=min(info.num_classes or _AUTO_K, _AUTO_K))
    missing = [i.name for i in info.inputs if i.name not in dataset.columns and i.name not in ("attention_mask", "token_type_ids")]
    if missing:
        raise DatasetError(
            f"the teacher needs input(s) {missing} but dataset {config.data} has columns {dataset.columns}; "
            "add a column per teacher input, named like the input"
        )
    if info.num_classes is not None and config.top_k > info.num_classes:
        raise TeacherError(f"top_k {config.top_k} is larger than the teacher's {info.num_classes} classes; use --top-k <= {info.num_classes}")
    fingerprint = dataset.fingerprint()
    request = request_for(info, fingerprint, config)
    key = fmt.cache_key(request)
    cache_dir = Path(config.cache_dir) / key

    if (cache_dir / fmt.MANIFEST).is_file():
        cache = fmt.open_cache(cache_dir)
        cache.verify(checksums=False)
        log(f"cache hit: {cache_dir} ({cache.manifest['num_positions']} positions; the teacher was not run)")
        return CacheResult(cache_dir, True, cache.manifest)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / _LOCK, "w")
    except OSError as exc:
        raise CacheError(f"cannot write the cache directory {cache_dir}: {exc.strerror}. Choose a writable --cache-dir.") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise CacheError(f"another cache-teacher process is writing {cache_dir}; wait for it to finish") from exc
    with lock:
        return _fill(config, dataset, info, request, key, cache_dir, progress, log)


def _fill(config, dataset: Dataset, info: TeacherInfo, request: dict, key: str, cache_dir: Path, progress: bool, log) -> CacheResult:
    for leftover in cache_dir.glob("*.tmp"):  # a shard or manifest torn by a crash; never complete
        leftover.unlink()
    request_path = cache_dir / REQUEST
    if request_path.is_file():
        shard_size = json.loads(request_path.read_text())["shard_size"]
    else:
        shard_size = config.shard_size or _DEFAULT_SHARD[info.kind]
        fmt.write_json_atomic({"key": key, "request": request, "shard_size": shard_size, "config": to_dict(config)}, request_path)
    done = fmt.read_journal(cache_dir)
    if done:
        log(f"resuming {cache_dir}: {len(done)} complete shard(s) kept")
    (cache_dir / fmt.JOURNAL).write_text("".join(json.dumps(e) + "\n" for e in done))  # drop a torn tail

    use_graph = config.postprocess == "graph" or (config.postprocess == "auto" and config.device == "cuda")
    teacher = Teacher(
        config.teacher,
        device=config.device,
        threads=config.threads,
        hidden=sorted(config.hidden),
        logits_output=config.logits_output or None,
        topk_in_graph=(config.top_k, float(config.temperature)) if use_graph else None,
    )
    if teacher.provider != "CUDAExecutionProvider" and config.postprocess == "auto" and use_graph:
        use_graph = False
    log(f"teacher {Path(config.teacher).name} ({info.kind}) on {teacher.provider}; top-k in {'graph' if use_graph else 'torch'}")

    num_shards = max(1, -(-dataset.num_rows // shard_size))
    started = time.perf_counter()
    positions_run = 0
    bar = tqdm(total=dataset.num_rows, initial=min(len(done) * shard_size, dataset.num_rows), unit="ex", disable=not progress, desc="cache-teacher")
    runner = _ShardRunner(teacher, dataset, config, info.kind)
    for s in range(len(done), num_shards):
        start, stop = s * shard_size, min((s + 1) * shard_size, dataset.num_rows)
        table, probe = runner.run(start, stop, bar)
        entry = fmt.write_shard(table, cache_dir / fmt.SHARD_PATTERN.format(s))
        entry.update(shard=s, examples=[start, stop], provider=teacher.provider)
        if probe is not None:
            entry["probe"] = probe
        fmt.append_journal(cache_dir, entry)
        done.append(entry)
        positions_run += table.num_rows
    bar.close()
    elapsed = time.perf_counter() - started

    manifest = _manifest(config, dataset, teacher, request, key, done, runner, elapsed, positions_run)
    fmt.write_json_atomic(manifest, cache_dir / fmt.MANIFEST)
    log(
        f"cached {manifest['num_positions']} positions in {len(done)} shard(s), "
        f"{manifest['bytes_per_position']:.1f} bytes/position, {elapsed:.1f}s"
    )
    return CacheResult(cache_dir, False, manifest)


def _manifest(config, dataset, teacher, request, key, done, runner, elapsed, positions_run) -> dict:
    import onnxruntime

    info = teacher.info
    num_positions = sum(e["rows"] for e in done)
    total_bytes = sum(e["bytes"] for e in done)
    probe = next((e["probe"] for e in done if "probe" in e), None)
    shards = [{k: e[k] for k in ("file", "rows", "sha256", "bytes", "examples")} for e in done]
    return {
        "format_version": fmt.FORMAT_VERSION,
        "key": key,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target_format": "topk",
        "teacher": {
            "path": str(Path(config.teacher).resolve()),
            "name": Path(config.teacher).name,
            "sha256": info.sha256,
            "inputs": [{"name": i.name, "dtype": np.dtype(i.dtype).name, "shape": list(i.shape)} for i in info.inputs],
            "logits_output": info.logits_output,
            "kind": info.kind,
            "num_classes": runner.num_classes,
        },
        "dataset": {
            "path": str(Path(config.data).resolve()),
            "fingerprint": request["dataset_fingerprint"],
            "num_rows": dataset.num_rows,
            "id_type": str(dataset.schema.field(ID_COLUMN).type),
        },
        "top_k": config.top_k,
        "temperature": float(config.temperature),
        "hidden": runner.hidden_shapes,
        "providers": sorted({e["provider"] for e in done}),
        "num_examples": dataset.num_rows,
        "num_positions": num_positions,
        "bytes": total_bytes,
        "bytes_per_position": total_bytes / max(num_positions, 1),
        "fidelity": probe,
        "shards": shards,
        "run": {"seconds": round(elapsed, 3), "positions": positions_run, "positions_per_second": round(positions_run / max(elapsed, 1e-9), 1)},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "pyarrow": pa.__version__},
        "request": request,
        "config": to_dict(config),
    }


class _ShardRunner:
    """Runs the teacher over one shard's rows and builds the shard's Arrow table (rows in dataset order)."""

    def __init__(self, teacher: Teacher, dataset: Dataset, config: CacheTeacherConfig, kind: str):
        self.teacher = teacher
        self.dataset = dataset
        self.config = config
        self.kind = kind
        self.num_classes: int | None = teacher.info.num_classes
        self.hidden_shapes: dict[str, list[int]] = {}
        self.probe_left = config.probe_positions
        self.probe_stats: dict[str, list[float]] = {"kl": [], "entropy": [], "top1": [], "tail": []}
        names = teacher.input_names
        self.columns = [ID_COLUMN] + [n for n in names if n in dataset.columns]
        self.schema = fmt.shard_schema(dataset.schema.field(ID_COLUMN).type, teacher.info.hidden)

    def run(self, start: int, stop: int, bar: tqdm) -> tuple[pa.Table, dict | None]:
        table = self.dataset.read(start, stop, self.columns)
        ids = table.column(ID_COLUMN).combine_chunks()
        arrays = {c: column_to_array(table.column(c), c) for c in self.columns[1:]}
        pieces: list[tuple[np.ndarray, dict]] = []  # (example indices, outputs) per batch
        for batch_idx, feeds, mask in self._batches(arrays, len(ids)):
            outs = self.teacher.run(feeds)
            pieces.append((batch_idx, self._postprocess(outs, feeds, mask, ids, batch_idx)))
            bar.update(len(batch_idx))
        return self._assemble(ids, pieces), self._probe_summary()

    # -- batching ---------------------------------------------------------------------------------------
    def _batches(self, arrays: dict, n: int):
        """Yield (example indices, feeds, position mask or None). Token batches group similar lengths."""
        bs = self.config.batch_size
        inputs = {i.name: i for i in self.teacher.info.inputs}
        if self.kind == CLASSIFIER:
            for lo in range(0, n, bs):
                idx = np.arange(lo, min(lo + bs, n))
                feeds = {}
                for name, inp in inputs.items():
                    if name not in arrays:
                        raise DatasetError(f"the classifier teacher needs input '{name}', which the dataset lacks")
                    feeds[name] = self._fixed(arrays[name], idx, inp)
                yield idx, feeds, None
            return
        lead = "input_ids" if "input_ids" in arrays else next(iter(arrays))
        lengths = np.array([len(r) for r in arrays[lead]])
        if (lengths == 0).any():
            bad = int(np.flatnonzero(lengths == 0)[0])
            raise DatasetError(f"row {bad} of the shard has an empty '{lead}'; every sequence needs at least one token")
        order = np.argsort(lengths, kind="stable")  # length grouping: little padding, fewer wasted positions
        for lo in range(0, n, bs):
            idx = np.sort(order[lo : lo + bs])
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
                elif name == "attention_mask":
                    feeds[name] = mask.astype(inp.dtype)
                elif name == "token_type_ids":
                    feeds[name] = np.zeros((len(idx), width), dtype=inp.dtype)
            yield idx, feeds, mask.astype(bool)

    @staticmethod
    def _fixed(column, idx: np.ndarray, inp) -> np.ndarray:
        if isinstance(column, list):
            shapes = {column[i].shape for i in idx}
            if len(shapes) > 1:
                raise DatasetError(f"column '{inp.name}' has rows of different shapes {sorted(shapes)[:3]}; a classifier input needs one shape")
            batch = np.stack([column[i] for i in idx])
        else:
            batch = column[idx]
        expected = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape[1:])
        got = batch.shape[1:]
        if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
            raise DatasetError(
                f"column '{inp.name}' has rows of shape {list(got)} but the teacher expects {list(inp.shape[1:])} per example"
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
    def _postprocess(self, outs: list[np.ndarray], feeds: dict, mask: np.ndarray | None, ids: pa.Array, idx: np.ndarray) -> dict:
        k, temperature = self.config.top_k, float(self.config.temperature)
        n_hidden = len(self.teacher.info.hidden)
        main, hidden = outs[: len(outs) - n_hidden], outs[len(outs) - n_hidden :]
        select = (lambda a: a.reshape(-1, *a.shape[2:])[mask.reshape(-1)]) if mask is not None else (lambda a: a)
        if self.teacher.topk_in_graph:
            top_ids, logp, logz = (torch.from_numpy(select(a)) for a in main)
            if self.num_classes is None:
                raise TeacherError("in-graph top-k needs a teacher whose vocabulary axis is fixed; use --postprocess torch")
            logits = None
        else:
            logits = torch.from_numpy(select(main[0]))
            vocab = logits.shape[-1]
            if self.num_classes is None:
                self.num_classes = vocab
            if k > vocab:
                raise TeacherError(f"top_k {k} is larger than the teacher's vocabulary of {vocab}; use --top-k <= {vocab}")
            top_ids, logp, logz = targets.topk_log_probs(logits, k, temperature)
        bad = ~torch.isfinite(logz) | torch.isnan(logp).any(-1)
        if bad.any():
            raise TeacherError(self._nonfinite_message(bad, mask, ids, idx))
        tail = targets.tail_mass(logp, self.num_classes)
        result = {"ids": top_ids.to(torch.int32).numpy(), "logp": logp.numpy(), "logz": logz.numpy(), "tail": tail.numpy()}
        if mask is not None:
            result["counts"] = mask.sum(1)
        for name, h in zip(self.teacher.info.hidden, hidden):
            if mask is not None and h.shape[:2] != mask.shape:
                raise TeacherError(f"hidden tensor '{name}' has shape {list(h.shape)}; a token-level teacher's hidden states must be [batch, seq, ...]")
            per_row = list(h.shape[2:] if mask is not None else h.shape[1:])
            self.hidden_shapes.setdefault(name, per_row)
            h = select(h)
            result["hidden." + name] = h.reshape(h.shape[0], -1).astype(np.float16)
        if self.probe_left > 0:
            self._probe(logits, feeds, mask, top_ids, logp, tail)
        return result

    def _probe(self, logits, feeds, mask, top_ids, logp, tail) -> None:
        """Dense statistics on the first positions: what the cache loses (KL), entropy, confidence."""
        if logits is None:  # in-graph top-k: ask the same session for the dense logits once
            dense = self.teacher.session.run([self.teacher.info.logits_output], feeds)[0]
            logits = torch.from_numpy(dense.reshape(-1, dense.shape[-1])[mask.reshape(-1)] if mask is not None else dense)
        n = min(self.probe_left, logits.shape[0])
        T = float(self.config.temperature)
        self.probe_stats["kl"] += targets.cache_fidelity_kl(logits[:n], T, top_ids[:n], logp[:n]).tolist()
        self.probe_stats["entropy"] += targets.entropy(logits[:n], T).tolist()
        self.probe_stats["top1"] += logp[:n, 0].exp().tolist()
        self.probe_stats["tail"] += tail[:n].tolist()
        self.probe_left -= n

    def _probe_summary(self) -> dict | None:
        """Summarise the probe once, from the first shard this run computes; later shards take none."""
        if not self.probe_stats["kl"]:
            return None
        s = {k: np.asarray(v) for k, v in self.probe_stats.items()}
        self.probe_stats = {k: [] for k in self.probe_stats}
        self.probe_left = 0
        return {
            "positions": int(len(s["kl"])),
            "kl_mean": float(s["kl"].mean()),
            "kl_max": float(s["kl"].max()),
            "entropy_mean": float(s["entropy"].mean()),
            "top1_prob_mean": float(s["top1"].mean()),
            "tail_mass_mean": float(s["tail"].mean()),
        }

    @staticmethod
    def _nonfinite_message(bad: torch.Tensor, mask, ids: pa.Array, idx: np.ndarray) -> str:
        first = int(torch.nonzero(bad)[0])
        if mask is not None:
            example = int(np.repeat(np.arange(len(idx)), mask.sum(1))[first])
        else:
            example = first
        return (
            f"the teacher produced NaN or infinite logits for id {ids[int(idx[example])].as_py()} "
            f"({int(bad.sum())} position(s) in this batch). Check the model and its input values; nothing was cached for this shard."
        )

    def _assemble(self, ids: pa.Array, pieces: list[tuple[np.ndarray, dict]]) -> pa.Table:
        """Concatenate batches back into dataset order: one row per position."""
        n = len(ids)
        k = self.config.top_k
        counts = np.ones(n, dtype=np.int64)
        for idx, res in pieces:
            if "counts" in res:
                counts[idx] = res["counts"]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(offsets[-1])
        names = ["ids", "logp", "logz", "tail"] + ["hidden." + h for h in self.teacher.info.hidden]
        out: dict[str, np.ndarray] = {}
        for idx, res in pieces:
            rows = _ranges(offsets[idx], counts[idx])  # where this batch's positions go in dataset order
            for name in names:
                arr = res[name]
                if name not in out:
                    out[name] = np.empty((total,) + arr.shape[1:], dtype=arr.dtype)
                out[name][rows] = arr
        example_of_row = np.repeat(np.arange(n), counts)
        position = np.arange(total) - offsets[example_of_row]
        columns = {
            "id": ids.take(pa.array(example_of_row)),
            "position": pa.array(position.astype(np.int32)),
            "topk_ids": _fixed_list(out["ids"], k),
            "topk_logp": _fixed_list(out["logp"], k),
            "logz": pa.array(out["logz"]),
            "tail_mass": pa.array(out["tail"]),
        }
        for name in names[4:]:
            columns[name] = _fixed_list(out[name], out[name].shape[1])
        return pa.table(columns, schema=self.schema)


def _fixed_list(values: np.ndarray, width: int) -> pa.ListArray:
    offsets = pa.array(np.arange(0, values.shape[0] * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1)))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    lengths = np.asarray(lengths)
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(np.asarray(starts) - before, lengths) + np.arange(int(lengths.sum()))
