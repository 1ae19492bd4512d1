"""Stage one: run a teacher once over a dataset and cache its exact top-k soft targets.

``run(config)`` is the whole stage: resolve the content key, return at once on a cache hit, otherwise resume
after the complete shards, run the teacher shard by shard (writing each shard atomically and journalling it),
and write the manifest last (``stages.cache_commit``).

Several workers split one cache by shard, shard s to worker s % W: the ranks of a torchrun job (rank 0 writes
the manifest once it has gathered every rank's shards) or launcher-free jobs given --num-workers and
--worker-index (the last to finish writes it). Each journals and resumes its own shards only, and the shards
are byte for byte those of one process: the split is not part of the key.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import threading
import time
from pathlib import Path

from tqdm import tqdm

from stages import cache_commit, distributed, storage
from stages import cache_format as fmt
from stages.cache_commit import CacheResult, writing
from stages.config import CacheTeacherConfig, to_dict
from stages.dataset import Dataset
from stages.errors import CacheError, ConfigError, DatasetError, TeacherError
from stages.export_teacher import read_card
from stages.formats import config_format, get_format
from stages.shard_runner import ShardRunner
from stages.storage import ObjectPath
from stages.teacher import (
    CLASSIFIER,
    CUDA_PROVIDER,
    TOKEN,
    Teacher,
    TeacherInfo,
    can_generate,
    check_hidden,
    inspect,
)

_DEFAULT_SHARD = {CLASSIFIER: 16_384, TOKEN: 512}  # examples per shard: the unit of resume
_AUTO_K = 32  # top_k when none is given and the vocabulary is large or unknown


def request_for(info: TeacherInfo, fingerprint: str, config: CacheTeacherConfig) -> dict:
    """Everything that determines the cached content, and nothing that does not (batch size, device, threads)."""
    target_format = config_format(config)
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
    """The stage, as one process, as one rank of a torchrun job, or as one launcher-free worker."""
    group = distributed.init(config.dist_timeout)  # gloo even beside GPUs: only small Python objects travel
    worker, workers = _worker(config, group)
    if workers > 1:
        log = functools.partial(_prefixed, log, f"worker {worker} of {workers}: ")
        progress = progress and (group is None or group.main)  # one bar per terminal
    result = _run(config, progress, log, group, worker, workers)
    distributed.close(group)
    return result


def _worker(config: CacheTeacherConfig, group: distributed.Group | None) -> tuple[int, int]:
    """(this worker's index, the number of workers): torchrun's rank and world size, else the launcher-free options."""
    if group is None:
        return config.worker_index, config.num_workers
    if config.num_workers != 1:
        raise ConfigError(
            f"--num-workers {config.num_workers} is for jobs started without torchrun; under torchrun the "
            f"{group.world_size} ranks are the workers. Drop --num-workers and --worker-index."
        )
    return group.rank, group.world_size


def _prefixed(log, prefix: str, message: str) -> None:
    log(prefix + message)


def _run(config, progress: bool, log, group, worker: int, workers: int) -> CacheResult:
    dataset = Dataset(config.data)
    dataset.check_unique_ids()
    inspected = inspect(config.teacher, config.logits_output or None)
    info, model, data = inspected
    check_hidden(model, config.hidden)
    if not config.hidden and config.postprocess != "graph":
        # The session is built from the bytes as they are: the parsed graph can go now. Kept alive while ONNX
        # Runtime builds the session, it made that 2x slower for a 1.2 GB teacher (~4 s against 8 s, measured).
        inspected = (info, None, data)
    del model, data
    if config.top_k == 0:  # auto: every class of a small classifier (exact), else a 32-wide top-k
        config = dataclasses.replace(config, top_k=min(info.num_classes or _AUTO_K, _AUTO_K))
        if config.min_k > config.top_k:  # config.problems() compared min_k with an explicit top_k only
            raise ConfigError(
                f"min_k {config.min_k} is more than the {config.top_k} ids --top-k 0 chose for this teacher; "
                f"give --top-k >= {config.min_k} or a smaller --min-k"
            )
    missing = [i.name for i in info.inputs if i.name not in dataset.columns and not can_generate(i.name)]
    if missing:
        raise DatasetError(
            f"the teacher needs input(s) {missing} but dataset {config.data} has columns {dataset.columns}; "
            "add a column per teacher input, named like the input"
        )
    if not get_format(config.target_format).drawn and info.num_classes is not None and config.top_k > info.num_classes:
        raise TeacherError(
            f"top_k {config.top_k} is larger than the teacher's {info.num_classes} classes; "
            f"use --top-k <= {info.num_classes}"
        )
    _check_tokenizer(config.teacher, dataset)
    fingerprint = dataset.fingerprint()
    request = request_for(info, fingerprint, config)
    key = fmt.cache_key(request)
    root = storage.location(config.cache_dir)
    cache_dir = root / key

    found = cache_dir if (cache_dir / fmt.MANIFEST).is_file() else _legacy_cache(root, request, dataset)
    if found is not None:
        cache = fmt.open_cache(found)
        cache.verify(checksums=False)
        legacy = "; written before datasets were fingerprinted by their rows" if found != cache_dir else ""
        log(f"cache hit: {found} ({cache.manifest['num_positions']} positions; the teacher was not run{legacy})")
        return CacheResult(found, True, cache.manifest)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        locks = _lock(cache_dir, worker, workers, config.dist_timeout)
    except OSError as exc:
        raise CacheError(
            f"cannot write the cache directory {cache_dir}: {exc.strerror}. Choose a writable --cache-dir."
        ) from exc
    # _fill gets the only reference to the teacher's bytes and protobuf, and lets go of them once the session is
    # built: the session holds its own copy of the weights, and a large teacher would otherwise be held 3 times.
    handed, inspected = [inspected], None
    try:
        return _fill(config, dataset, handed, request, key, cache_dir, progress, log, group, worker, workers, locks)
    finally:
        for lock in locks:
            lock.close()


def _legacy_cache(root: Path | ObjectPath, request: dict, dataset: Dataset) -> Path | None:
    """A cache of this same request written before datasets were fingerprinted by their rows: its manifest has
    no ``fingerprint_of``, and its key hashes the dataset's files (names and bytes) instead. The files are hashed
    only when such a cache matches the rest of the request. Local cache folders only."""
    if not isinstance(root, Path) or not root.is_dir():
        return None
    rest = {k: v for k, v in request.items() if k != "dataset_fingerprint"}
    files = None
    for manifest_path in sorted(root.glob(f"*/{fmt.MANIFEST}")):
        try:
            manifest = json.loads(manifest_path.read_text())
            old = manifest["request"]
            written_by_rows = "fingerprint_of" in manifest["dataset"]
            same_rest = {k: v for k, v in old.items() if k != "dataset_fingerprint"} == rest
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a cache this can read; `pipeline caches list` names what is wrong with it
        if written_by_rows or not same_rest:
            continue
        files = files or dataset.file_fingerprint()
        if manifest_path.parent.name == fmt.cache_key(old) and old.get("dataset_fingerprint") == files:
            return manifest_path.parent
    return None


def _lock(cache_dir: Path | ObjectPath, worker: int, workers: int, wait: float) -> list:
    """The flocks a writer holds: the cache's own, exclusively (one process), or shared plus its worker's own.

    A worker waits up to ``wait`` seconds for an exclusive holder (another worker sealing the cache) to let go.
    """
    if workers == 1:
        lock = fmt.try_lock(cache_dir)
        if lock is None:
            stale = (
                f" (if none is, e.g. it was killed on another host, delete {cache_dir / fmt.LOCK} and re-run)"
                if isinstance(cache_dir, ObjectPath)
                else ""
            )
            raise CacheError(f"another cache-teacher process is writing {cache_dir}; wait for it to finish{stale}")
        return [lock]
    deadline = time.monotonic() + wait
    while (shared := fmt.try_lock(cache_dir, shared=True)) is None:
        if time.monotonic() > deadline:
            raise CacheError(
                f"{cache_dir} stayed locked by a single cache-teacher process (or a commit) for {wait:g}s; "
                "wait for it to finish, then start the workers again"
            )
        time.sleep(0.5)
    own = fmt.try_lock(cache_dir, name=fmt.WORKER_LOCK.format(worker))
    if own is None:
        shared.close()
        raise CacheError(
            f"worker {worker} of {workers} is already writing {cache_dir}; give every job its own --worker-index"
        )
    return [shared, own]


def _fill(
    config,
    dataset: Dataset,
    handed: list[tuple],
    request: dict,
    key: str,
    cache_dir: Path | ObjectPath,
    progress: bool,
    log,
    group,
    worker: int,
    workers: int,
    locks: list,
) -> CacheResult:
    info = handed[0][0]
    # The first writer's shard size holds for every later one (a resume, the other workers): shards must tile.
    # Absolute paths: the record is a --config file that repeats this cache from any directory; and one process,
    # since how this command split the work is not what the cache is.
    paths = {name: str(Path(getattr(config, name)).resolve()) for name in ("teacher", "data", "cache_dir")}
    config_record = to_dict(config) | paths | {"num_workers": 1, "worker_index": 0}
    record = {"key": key, "request": request, "shard_size": config.shard_size or _DEFAULT_SHARD[info.kind]}
    shard_size = fmt.claim_json(record | {"config": config_record}, cache_dir / fmt.REQUEST)["shard_size"]
    if config.shard_size and config.shard_size != shard_size:
        log(f"note: --shard-size {config.shard_size} ignored: this cache was started with {shard_size} (shards tile)")
    num_shards = max(1, -(-dataset.num_rows // shard_size))
    mine = list(range(worker, num_shards, workers))  # the deal: shard s belongs to worker s % W
    # A shard or manifest torn by a crash is never complete; one worker of several clears only its own shards'.
    torn = (
        cache_dir.glob("*.tmp") if workers == 1 else (cache_dir / (fmt.SHARD_PATTERN.format(s) + ".tmp") for s in mine)
    )
    for leftover in list(torn):
        leftover.unlink(missing_ok=True)
    done = {e["shard"]: e for e in fmt.read_journal(cache_dir, set(mine))}
    if done:
        log(f"resuming {cache_dir}: {len(done)} complete shard(s) kept")
    journal = fmt.journal_path(cache_dir, worker, workers)
    journal.write_text("".join(json.dumps(done[s]) + "\n" for s in sorted(done)))  # drop a torn tail

    device_id = group.local_rank if group is not None else 0  # each rank on its own host's GPU
    # The host kernel loads while ONNX Runtime builds the session (~0.5 s each); with in-graph top-k it is not used.
    warm = threading.Thread(target=_warm_up_kernel, daemon=True) if config.postprocess != "graph" else None
    if warm is not None:
        warm.start()
    teacher = _load_teacher(config, handed.pop(), topk_in_graph=config.postprocess == "graph", device_id=device_id)
    postprocess = choose_postprocess(config.postprocess, config.target_format, teacher.provider)
    if postprocess == "graph" and not teacher.topk_in_graph:  # auto, and CUDA really runs: add the top-k head
        teacher = None  # release the first session's device memory before the second loads
        teacher = _load_teacher(config, None, topk_in_graph=True, device_id=device_id)  # its bytes were let go
    log(
        f"teacher {Path(config.teacher).name} ({info.kind}) on {teacher.provider}; "
        + ("sampled targets" if get_format(config.target_format).drawn else f"top-k in {postprocess}")
    )

    def examples(s: int) -> tuple[int, int]:
        return s * shard_size, min((s + 1) * shard_size, dataset.num_rows)

    positions_run = 0
    bar = tqdm(
        total=sum(examples(s)[1] - examples(s)[0] for s in mine),
        initial=sum(examples(s)[1] - examples(s)[0] for s in done),
        unit="ex",
        disable=not progress,
        desc="cache-teacher",
    )
    runner = ShardRunner(teacher, dataset, config, info.kind)
    if warm is not None:
        warm.join()
    started = time.perf_counter()  # the shard loop alone: loading the teacher and the kernel is start-up
    for s in (s for s in mine if s not in done):
        shard_started = time.perf_counter()
        start, stop = examples(s)
        table, probe = runner.run(start, stop, bar)
        shard_path = cache_dir / fmt.SHARD_PATTERN.format(s)
        with writing(shard_path, len(done)):
            entry = fmt.write_shard(table, shard_path, runner.format.parquet_options)
            # The shapes and vocabulary the runner learnt: a resume that computes no shard still knows them.
            entry.update(
                shard=s,
                examples=[start, stop],
                provider=teacher.provider,
                hidden=runner.hidden_shapes,
                num_classes=runner.num_classes,
                postprocess=postprocess,
                worker=worker,
                seconds=round(time.perf_counter() - shard_started, 3),
            )
            if probe is not None:
                entry["probe"] = probe
            fmt.append_journal(cache_dir, entry, worker, workers)
        done[s] = entry
        positions_run += table.num_rows
    bar.close()
    run = {"seconds": time.perf_counter() - started, "positions": positions_run}
    learnt = {"hidden": runner.hidden_shapes, "num_classes": runner.num_classes}
    entries = [done[s] for s in mine]
    seal = functools.partial(cache_commit.seal, cache_dir, config, dataset, info, request)
    if group is not None:
        return _seal_on_rank_zero(group, seal, cache_dir, entries, learnt, run, log)
    if workers > 1:
        return _seal_if_last(seal, cache_dir, num_shards, locks, log)
    return seal(entries, learnt, run, log)


def _seal_on_rank_zero(group: distributed.Group, seal, cache_dir: Path, entries, learnt, run, log) -> CacheResult:
    """torchrun: every rank's shards go to rank 0, which writes the manifest; then every rank returns it."""
    gathered = group.gather((entries, run), "collecting every rank's shards")
    manifest = None
    if group.main:
        every = [e for rank_entries, _ in gathered for e in rank_entries]
        job = {
            "seconds": max(r["seconds"] for _, r in gathered),  # the slowest rank's: the job's wall time
            "positions": sum(r["positions"] for _, r in gathered),
        }
        manifest = seal(every, learnt, job, log).manifest
    manifest = group.gather(manifest, "waiting for rank 0 to write the manifest")[0]
    return CacheResult(cache_dir, False, manifest)


def _seal_if_last(seal, cache_dir: Path | ObjectPath, num_shards: int, locks: list, log) -> CacheResult:
    """Launcher-free: the worker that finds every other gone (the cache's lock free) and every shard in place
    writes the manifest; any other leaves it to the last one, or to ``pipeline caches commit``."""
    locks[0].close()  # give up this worker's share: whoever tries after every worker did so gets it whole
    lock = fmt.try_lock(cache_dir)
    if lock is not None:
        with lock:
            entries = fmt.read_journal(cache_dir)  # every worker's shards, each checked against its sha256
            if len(entries) == num_shards:
                return seal(entries, {"hidden": {}, "num_classes": None}, cache_commit.journal_run(entries), log)
    log(
        f"this worker's shards are done; {cache_dir.name} is not complete until every worker's are. The last worker "
        f"to finish writes the manifest (or run `pipeline caches commit {cache_dir.name}` after them)"
    )
    return CacheResult(cache_dir, False, {})


def choose_postprocess(postprocess: str, target_format: str, provider: str) -> str:
    """Where top-k runs, decided once the session has loaded and says which provider really runs.

    ``auto`` picks "graph" only on the CUDA provider, where keeping the full logits on the device pays; on CPU
    "host" is faster (benchmarks/cache_throughput.py). Sampled targets need the full logits: always "host".
    """
    if get_format(target_format).drawn:
        return "host"
    if postprocess == "auto":
        return "graph" if provider == CUDA_PROVIDER else "host"
    return postprocess


def _warm_up_kernel() -> None:
    importlib.import_module("stages.topk_kernel").warm_up()  # numba's import is half of the ~1 s


def _load_teacher(config: CacheTeacherConfig, inspected: tuple, topk_in_graph: bool, device_id: int) -> Teacher:
    return Teacher(
        config.teacher,
        device=config.device,
        device_id=device_id,
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
