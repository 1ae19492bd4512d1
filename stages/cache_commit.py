"""The last step of stage one: every shard journalled and checked -> the manifest, written once.

``seal`` is called by whoever finishes a cache: the single cache-teacher process, rank 0 of a torchrun job
after gathering every rank's shards, or the last launcher-free worker. ``commit`` seals a cache from its
files alone (``pipeline caches commit KEY``), for launcher-free workers whose last one could not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stages import cache_format as fmt
from stages import storage
from stages.config import CacheTeacherConfig, load_config, to_dict
from stages.dataset import FINGERPRINT_OF, ID_COLUMN, Dataset
from stages.errors import CacheError
from stages.formats import config_format
from stages.storage import ObjectPath
from stages.teacher import TeacherInfo, inspect


@dataclass
class CacheResult:
    path: Path | ObjectPath
    hit: bool
    manifest: dict  # empty when this worker finished its shards but others have not: no manifest yet


@contextmanager
def writing(path: Path | ObjectPath, kept: int) -> Iterator[None]:
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


def seal(
    cache_dir: Path | ObjectPath,
    config: CacheTeacherConfig,
    dataset: Dataset,
    info: TeacherInfo,
    request: dict,
    entries: list[dict],
    learnt: dict,
    run: dict,
    log,
) -> CacheResult:
    """Write the manifest of ``entries`` (every shard's journal entry), or say which shards are missing.

    ``learnt``: the hidden shapes and vocabulary the writer's shard runner saw, for journals without them.
    ``run``: ``seconds`` and ``positions`` of the job that computed the shards.
    """
    num_shards = max(1, -(-dataset.num_rows // _shard_size(cache_dir)))
    entries = sorted({e["shard"]: e for e in entries}.values(), key=lambda e: e["shard"])
    missing = sorted(set(range(num_shards)) - {e["shard"] for e in entries})
    if missing:
        raise CacheError(
            f"cache {cache_dir} lacks {len(missing)} of its {num_shards} shards ({_span(missing)}), so it gets no "
            "manifest yet; run the cache-teacher workers that own them (the same command) to finish it"
        )
    manifest = _manifest(config, dataset, info, request, entries, learnt, run)
    with writing(cache_dir / fmt.MANIFEST, len(entries)):
        manifest = fmt.write_manifest(manifest, cache_dir)
    log(
        f"cached {manifest['num_positions']} positions in {len(entries)} shard(s), "
        f"{manifest['bytes_per_position']:.1f} bytes/position, {run['seconds']:.1f}s"
    )
    return CacheResult(cache_dir, False, manifest)


def commit(cache_dir: Path | ObjectPath, log=print) -> CacheResult:
    """Seal a cache from its request, journals and shards (each checked against its sha256) once all exist."""
    if (cache_dir / fmt.MANIFEST).is_file():
        cache = fmt.open_cache(cache_dir)
        log(f"cache {cache_dir} is already complete")
        return CacheResult(cache_dir, True, cache.manifest)
    request_path = cache_dir / fmt.REQUEST
    if not request_path.is_file():
        raise CacheError(f"{cache_dir} has no {fmt.REQUEST}: cache-teacher never started it, nothing to commit")
    lock = fmt.try_lock(cache_dir)
    if lock is None:
        raise CacheError(
            f"cache-teacher workers are still writing {cache_dir}; the last one to finish writes the manifest "
            "(or run this again once they have all stopped)"
        )
    with lock:
        record = json.loads(request_path.read_text())
        config = load_config(CacheTeacherConfig, None, record["config"])
        request = record["request"]
        dataset = Dataset(config.data)
        info = inspect(config.teacher, config.logits_output or None)[0]
        for what, have, want in (
            ("teacher", info.sha256, request["teacher_sha256"]),
            ("dataset", dataset.fingerprint(), request["dataset_fingerprint"]),
        ):
            if have != want:
                raise CacheError(
                    f"the {what} at {getattr(config, what if what == 'teacher' else 'data')} changed since cache "
                    f"{cache_dir.name} was started (sha {have[:12]}, the request says {want[:12]}); restore it, "
                    "or remove the cache and run cache-teacher again"
                )
        entries = fmt.read_journal(cache_dir)
        learnt = {"hidden": {}, "num_classes": info.num_classes}
        return seal(cache_dir, config, dataset, info, request, entries, learnt, journal_run(entries), log)


def journal_run(entries: list[dict]) -> dict:
    """What the journals say of the job: the busiest worker's shard seconds, and the positions computed."""
    per_worker: dict[int, float] = {}
    for e in entries:
        per_worker[e.get("worker", 0)] = per_worker.get(e.get("worker", 0), 0.0) + e.get("seconds", 0.0)
    return {"seconds": max(per_worker.values(), default=0.0), "positions": sum(e["rows"] for e in entries)}


def _shard_size(cache_dir: Path | ObjectPath) -> int:
    return int(json.loads((cache_dir / fmt.REQUEST).read_text())["shard_size"])


def _span(shards: list[int]) -> str:
    shown = ", ".join(str(s) for s in shards[:8])
    return f"shard {shown}" + (" ..." if len(shards) > 8 else "")


def _manifest(config, dataset, info: TeacherInfo, request, done, learnt, run) -> dict:
    import onnxruntime

    num_positions = sum(e["rows"] for e in done)
    total_bytes = sum(e["bytes"] for e in done)
    probe = next((e["probe"] for e in done if "probe" in e), None)
    learnt = done[-1] if "hidden" in done[-1] else learnt
    shards = [{k: e[k] for k in ("file", "rows", "sha256", "bytes", "examples")} for e in done]
    workers: dict[int, dict] = {}
    for e in done:  # what each worker (torchrun rank) ran on; journals older than workers count as worker 0
        w = workers.setdefault(e.get("worker", 0), {"worker": e.get("worker", 0), "providers": set(), "shards": 0})
        w["providers"].add(e["provider"])
        w["shards"] += 1
    target_format = config_format(config)
    return {
        "format_version": target_format.format_version,
        "key": fmt.cache_key(request),
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
            "path": storage.display(config.data),
            "fingerprint": request["dataset_fingerprint"],
            "fingerprint_of": FINGERPRINT_OF,
            "num_rows": dataset.num_rows,
            "id_type": str(dataset.schema.field(ID_COLUMN).type),
        },
        "tokenizer_sha256": dataset.tokenizer_sha256,  # prepare-data's; train-student checks students against it
        **target_format.manifest_fields(config),
        "temperature": float(config.temperature),
        "hidden": learnt["hidden"],
        "providers": sorted({e["provider"] for e in done}),
        # Where top-k ran, per session like providers (a journal written before this field lacks it).
        "postprocess": sorted({e["postprocess"] for e in done if "postprocess" in e}),
        "workers": [w | {"providers": sorted(w["providers"])} for _, w in sorted(workers.items())],
        "num_examples": dataset.num_rows,
        "num_positions": num_positions,
        "bytes": total_bytes,
        "bytes_per_position": total_bytes / max(num_positions, 1),
        "fidelity": probe,
        "shards": shards,
        "run": {
            "seconds": round(run["seconds"], 3),
            "positions": run["positions"],
            "positions_per_second": round(run["positions"] / max(run["seconds"], 1e-9), 1),
        },
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "pyarrow": pa.__version__},
        "request": request,
        "config": to_dict(config),
    }
