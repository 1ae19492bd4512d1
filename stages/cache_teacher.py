"""Stage one: run a teacher once over a dataset and cache its exact top-k soft targets.

``run(config)`` is the whole stage: resolve the content key, return at once on a cache hit, otherwise resume
after the last complete shard, run the teacher shard by shard (writing each shard atomically and journalling
it), and write the manifest last.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from stages import cache_format as fmt
from stages.config import CacheTeacherConfig, to_dict
from stages.dataset import FINGERPRINT_OF, ID_COLUMN, Dataset
from stages.errors import CacheError, DatasetError, TeacherError
from stages.export_teacher import read_card
from stages.formats import get_format
from stages.shard_runner import ShardRunner
from stages.teacher import CLASSIFIER, TOKEN, Teacher, TeacherInfo, check_hidden, inspect

_DEFAULT_SHARD = {CLASSIFIER: 16_384, TOKEN: 512}  # examples per shard: the unit of resume
_AUTO_K = 32  # top_k when none is given and the vocabulary is large or unknown


@dataclass
class CacheResult:
    path: Path
    hit: bool
    manifest: dict


def request_for(info: TeacherInfo, fingerprint: str, config: CacheTeacherConfig) -> dict:
    """Everything that determines the cached content, and nothing that does not (batch size, device, threads)."""
    target_format = get_format(config.target_format, config.encoding)
    request = {
        "target_format": target_format.name,
        "teacher_sha256": info.sha256,
        "logits_output": info.logits_output,
        "dataset_fingerprint": fingerprint,
        "temperature": float(config.temperature),
        "hidden": sorted(config.hidden),
    }
    return request | target_format.request(config)


def run(config: CacheTeacherConfig, progress: bool = True, log=print) -> CacheResult:
    dataset = Dataset(config.data)
    dataset.check_unique_ids()
    inspected = inspect(config.teacher, config.logits_output or None)
    info, model, _ = inspected
    check_hidden(model, config.hidden)
    del model
    if config.top_k == 0:  # auto: every class of a small classifier (exact), else a 32-wide top-k
        config = dataclasses.replace(config, top_k=min(info.num_classes or _AUTO_K, _AUTO_K))
    missing = [
        i.name
        for i in info.inputs
        if i.name not in dataset.columns and i.name not in ("attention_mask", "token_type_ids")
    ]
    if missing:
        raise DatasetError(
            f"the teacher needs input(s) {missing} but dataset {config.data} has columns {dataset.columns}; "
            "add a column per teacher input, named like the input"
        )
    if not get_format(config.target_format).drawn and info.num_classes is not None and config.top_k > info.num_classes:
        raise TeacherError(
            f"top_k {config.top_k} is larger than the teacher's {info.num_classes} classes; use --top-k <= {info.num_classes}"
        )
    _check_tokenizer(config.teacher, dataset)
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
        lock = fmt.try_lock(cache_dir)
    except OSError as exc:
        raise CacheError(
            f"cannot write the cache directory {cache_dir}: {exc.strerror}. Choose a writable --cache-dir."
        ) from exc
    if lock is None:
        raise CacheError(f"another cache-teacher process is writing {cache_dir}; wait for it to finish")
    # _fill gets the only reference to the teacher's bytes and protobuf, and lets go of them once the session is
    # built: the session holds its own copy of the weights, and a large teacher would otherwise be held 3 times.
    handed, inspected = [inspected], None
    with lock:
        return _fill(config, dataset, handed, request, key, cache_dir, progress, log)


def _fill(
    config, dataset: Dataset, handed: list[tuple], request: dict, key: str, cache_dir: Path, progress: bool, log
) -> CacheResult:
    info = handed[0][0]
    for leftover in cache_dir.glob("*.tmp"):  # a shard or manifest torn by a crash; never complete
        leftover.unlink()
    request_path = cache_dir / fmt.REQUEST
    if request_path.is_file():
        shard_size = json.loads(request_path.read_text())["shard_size"]
    else:
        shard_size = config.shard_size or _DEFAULT_SHARD[info.kind]
        # Absolute paths: the record is a --config file that repeats this cache from any directory.
        paths = {name: str(Path(getattr(config, name)).resolve()) for name in ("teacher", "data", "cache_dir")}
        record = {"key": key, "request": request, "shard_size": shard_size, "config": to_dict(config) | paths}
        fmt.write_json_atomic(record, request_path)
    done = fmt.read_journal(cache_dir)
    if done:
        log(f"resuming {cache_dir}: {len(done)} complete shard(s) kept")
    (cache_dir / fmt.JOURNAL).write_text("".join(json.dumps(e) + "\n" for e in done))  # drop a torn tail

    teacher = _load_teacher(config, handed.pop(), topk_in_graph=config.postprocess == "graph")
    postprocess = choose_postprocess(config.postprocess, config.target_format, teacher.provider)
    if postprocess == "graph" and not teacher.topk_in_graph:  # auto, and CUDA really runs: add the top-k head
        teacher = None  # release the first session's device memory before the second loads
        teacher = _load_teacher(config, None, topk_in_graph=True)  # reads the model again: its bytes were let go
    log(
        f"teacher {Path(config.teacher).name} ({info.kind}) on {teacher.provider}; "
        + ("sampled targets" if get_format(config.target_format).drawn else f"top-k in {postprocess}")
    )

    num_shards = max(1, -(-dataset.num_rows // shard_size))
    started = time.perf_counter()
    positions_run = 0
    bar = tqdm(
        total=dataset.num_rows,
        initial=min(len(done) * shard_size, dataset.num_rows),
        unit="ex",
        disable=not progress,
        desc="cache-teacher",
    )
    runner = ShardRunner(teacher, dataset, config, info.kind)
    for s in range(len(done), num_shards):
        start, stop = s * shard_size, min((s + 1) * shard_size, dataset.num_rows)
        table, probe = runner.run(start, stop, bar)
        shard_path = cache_dir / fmt.SHARD_PATTERN.format(s)
        with _writing(shard_path, len(done)):
            entry = fmt.write_shard(table, shard_path, runner.format.parquet_options)
            # The shapes and vocabulary the runner learnt: a resume that computes no shard still knows them.
            entry.update(
                shard=s,
                examples=[start, stop],
                provider=teacher.provider,
                hidden=runner.hidden_shapes,
                num_classes=runner.num_classes,
                postprocess=postprocess,
            )
            if probe is not None:
                entry["probe"] = probe
            fmt.append_journal(cache_dir, entry)
        done.append(entry)
        positions_run += table.num_rows
    bar.close()
    elapsed = time.perf_counter() - started

    manifest = _manifest(config, dataset, teacher, request, key, done, runner, elapsed, positions_run)
    with _writing(cache_dir / fmt.MANIFEST, len(done)):
        manifest = fmt.write_manifest(manifest, cache_dir)
    log(
        f"cached {manifest['num_positions']} positions in {len(done)} shard(s), "
        f"{manifest['bytes_per_position']:.1f} bytes/position, {elapsed:.1f}s"
    )
    return CacheResult(cache_dir, False, manifest)


@contextmanager
def _writing(path: Path, kept: int) -> Iterator[None]:
    """A failed write (above all a full disk) becomes a CacheError that says the complete shards are kept.

    The writers leave no temp file and the manifest is not written, so the same command resumes after the
    ``kept`` shards already journalled.
    """
    try:
        yield
    except OSError as exc:
        where = f"{kept} complete shard(s) kept in {path.parent}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"disk full while writing {path.name}: {where}; free space and re-run the same command to resume"
            ) from exc
        raise CacheError(
            f"cannot write {path}: {exc.strerror or exc}; {where}; fix that and re-run the same command to resume"
        ) from exc


def choose_postprocess(postprocess: str, target_format: str, provider: str) -> str:
    """Where top-k runs, decided once the session has loaded and says which provider really runs.

    ``auto`` picks "graph" only on the CUDA provider, where keeping the full logits on the device pays; on CPU
    "torch" is faster (benchmarks/cache_throughput.py). Sampled targets need the full logits: always "torch".
    """
    if get_format(target_format).drawn:
        return "torch"
    if postprocess == "auto":
        return "graph" if provider == "CUDAExecutionProvider" else "torch"
    return postprocess


def _load_teacher(config: CacheTeacherConfig, inspected: tuple, topk_in_graph: bool) -> Teacher:
    return Teacher(
        config.teacher,
        device=config.device,
        threads=config.threads,
        hidden=sorted(config.hidden),
        logits_output=config.logits_output or None,
        topk_in_graph=(config.top_k, float(config.temperature)) if topk_in_graph else None,
        inspected=inspected,
    )


def _check_tokenizer(teacher: str, dataset: Dataset) -> None:
    """Data tokenised by prepare-data must use the tokenizer of a teacher made by export-teacher."""
    card = read_card(Path(teacher).parent)
    want = card.get("tokenizer_sha256") if card else None
    if want and dataset.tokenizer_sha256 and dataset.tokenizer_sha256 != want:
        raise DatasetError(
            f"dataset {dataset.path} was tokenised with another tokenizer (sha256 {dataset.tokenizer_sha256[:12]}) "
            f"than the teacher's (sha256 {want[:12]}); re-run prepare-data with --tokenizer {Path(teacher).parent}"
        )


def _manifest(config, dataset, teacher, request, key, done, runner, elapsed, positions_run) -> dict:
    import onnxruntime

    info = teacher.info
    num_positions = sum(e["rows"] for e in done)
    total_bytes = sum(e["bytes"] for e in done)
    probe = next((e["probe"] for e in done if "probe" in e), None)
    learnt = done[-1] if "hidden" in done[-1] else {"hidden": runner.hidden_shapes, "num_classes": runner.num_classes}
    shards = [{k: e[k] for k in ("file", "rows", "sha256", "bytes", "examples")} for e in done]
    return {
        "format_version": get_format(config.target_format, config.encoding).format_version,
        "key": key,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "target_format": config.target_format,
        "teacher": {
            "path": str(Path(config.teacher).resolve()),
            "name": Path(config.teacher).name,
            "sha256": info.sha256,
            "external_data": [dataclasses.asdict(f) for f in info.external_data],
            "inputs": [{"name": i.name, "dtype": np.dtype(i.dtype).name, "shape": list(i.shape)} for i in info.inputs],
            "logits_output": info.logits_output,
            "kind": info.kind,
            "num_classes": learnt["num_classes"],
        },
        "dataset": {
            "path": str(Path(config.data).resolve()),
            "fingerprint": request["dataset_fingerprint"],
            "fingerprint_of": FINGERPRINT_OF,
            "num_rows": dataset.num_rows,
            "id_type": str(dataset.schema.field(ID_COLUMN).type),
        },
        "tokenizer_sha256": dataset.tokenizer_sha256,  # prepare-data's; train-student checks students against it
        **get_format(config.target_format, config.encoding).manifest_fields(config),
        "temperature": float(config.temperature),
        "hidden": learnt["hidden"],
        "providers": sorted({e["provider"] for e in done}),
        # Where top-k ran, per session like providers (a journal written before this field lacks it).
        "postprocess": sorted({e["postprocess"] for e in done if "postprocess" in e}),
        "num_examples": dataset.num_rows,
        "num_positions": num_positions,
        "bytes": total_bytes,
        "bytes_per_position": total_bytes / max(num_positions, 1),
        "fidelity": probe,
        "shards": shards,
        "run": {
            "seconds": round(elapsed, 3),
            "positions": positions_run,
            "positions_per_second": round(positions_run / max(elapsed, 1e-9), 1),
        },
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "pyarrow": pa.__version__},
        "request": request,
        "config": to_dict(config),
    }
