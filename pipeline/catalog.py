"""The catalog: SQL views over the caches under a cache root and the runs under a runs root, with DuckDB.

Where the truth lives: in the files the two stages already write, and nowhere else. A cache is its directory
(``manifest.json``, the shards); a run is its directory (``config.json``, ``metrics.json``, ``metrics.csv``).
Every command builds the catalog afresh from them in an in-memory DuckDB connection and throws it away; no
catalog database is ever stored, so nothing can go stale: delete or corrupt a cache and the next command sees
it. Building is cheap: it reads small JSON/CSV files and directory listings; Parquet shards are read only when
a query touches ``positions`` (or ``caches show`` computes its statistics). ``stages.run_dir`` reads the runs.
Either root may be an object-store URI (s3://bucket/prefix): DuckDB then scans the shards as Arrow datasets read
through pyarrow's filesystem, so it needs no httpfs extension (no download).

Views (SQL names; the README, "Catalog, queries and reports", lists every column):

    caches      one row per directory under the cache root, complete or not (status says which)
    shards      one row per shard a manifest lists, with whether its file is present
    runs        one row per run directory (any directory under the runs root holding config.json), with its
                status (complete / running / interrupted) and last logged step
    run_caches  which cache each run used: run, cache_key, role ('train' | 'eval')
    epochs      one row per run epoch, from metrics.csv
    steps       one row per logged training step (every --log-every steps), from metrics.csv
    positions   one row per cached position of every complete cache (only with ``positions=True``)
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from stages import cache_format as fmt
from stages import run_dir, storage
from stages.config import default_cache_root
from stages.errors import CacheError, ConfigError, PipelineError
from stages.formats import format_of, view_columns
from stages.storage import ObjectPath

_KEY_NAME = re.compile(rf"^[0-9a-f]{{{fmt.KEY_LENGTH}}}$")
# Hidden states stay out of the view; each target format fills its own columns and leaves the other's NULL.
_QUANTILES = (0.01, 0.5, 0.9, 0.99)  # reported by `caches show` beside the mean, min and max

CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("problem", pa.string()),  # why it is unreadable, or its missing shards (None when sound or incomplete)
        ("complete", pa.bool_()),
        ("path", pa.string()),
        ("teacher", pa.string()),
        ("teacher_sha256", pa.string()),
        ("kind", pa.string()),
        ("num_classes", pa.int64()),
        ("dataset_path", pa.string()),
        ("dataset_fingerprint", pa.string()),
        ("dataset_rows", pa.int64()),
        ("target_format", pa.string()),
        ("targets", pa.string()),  # what a position holds, in words: "top-32, int8 log-probs", "64 draws"
        ("top_k", pa.int64()),
        ("encoding", pa.string()),
        ("top_p", pa.float64()),  # None: a fixed k per position
        ("min_k", pa.int64()),
        ("temperature", pa.float64()),
        ("hidden", pa.list_(pa.string())),
        ("num_positions", pa.int64()),
        ("num_shards", pa.int64()),
        ("bytes_on_disk", pa.int64()),
        ("created", pa.string()),
        ("probe_positions", pa.int64()),
        ("probe_kl_mean", pa.float64()),
        ("probe_kl_max", pa.float64()),
        ("probe_entropy_mean", pa.float64()),
        ("probe_top1_mean", pa.float64()),
        ("probe_tail_mass_mean", pa.float64()),
        ("runs", pa.int64()),
    ]
)
SHARD_SCHEMA = pa.schema(
    [
        ("cache_key", pa.string()),
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("present", pa.bool_()),
    ]
)
RUN_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("status", pa.string()),
        ("complete", pa.bool_()),
        ("last_step", pa.int64()),
        ("path", pa.string()),
        ("method", pa.string()),
        ("student", pa.string()),
        ("alpha", pa.float64()),
        ("temperature", pa.float64()),
        ("epochs", pa.int64()),
        ("data", pa.string()),
        ("eval_data", pa.string()),
        ("cache_keys", pa.list_(pa.string())),
        ("eval_cache_key", pa.string()),
        ("student_parameters", pa.int64()),
        ("train_seconds", pa.float64()),
        ("test_accuracy", pa.float64()),
        ("test_agreement", pa.float64()),
        ("test_kl", pa.float64()),
        ("test_perplexity", pa.float64()),
        ("metrics", pa.map_(pa.string(), pa.float64())),
        ("finished", pa.string()),
    ]
)
RUN_CACHE_SCHEMA = pa.schema([("run", pa.string()), ("cache_key", pa.string()), ("role", pa.string())])


def default_runs_root() -> str:
    """$KD_RUNS_DIR, else runs/ in the working directory (where data/run_default.sh writes)."""
    return os.environ.get("KD_RUNS_DIR") or "runs"


@dataclass
class CacheEntry:
    """One directory under the cache root. ``manifest`` is None unless the cache is complete and readable."""

    key: str
    path: Path | ObjectPath
    status: str  # complete | incomplete (no manifest) | missing shards | unreadable (bad manifest)
    manifest: dict | None
    bytes_on_disk: int
    problem: str = ""

    @property
    def reason(self) -> str:
        """The problem's first line, less the "cache PATH" it starts with: a listing names the cache already."""
        return self.problem.split("\n", 1)[0].removeprefix(f"cache {self.path}").lstrip(": ")

    def shard_files(self) -> list[Path | ObjectPath]:
        return [self.path / s["file"] for s in self.manifest["shards"]] if self.manifest else []


@dataclass
class RunEntry:
    """One run directory. ``metrics`` is None while the run has not finished (``status`` says why)."""

    name: str
    path: Path | ObjectPath
    config: dict
    metrics: dict | None
    cache_keys: list[str]
    eval_cache_key: str | None
    status: str = run_dir.COMPLETE
    rows: list[dict] = field(default_factory=list)  # metrics.csv: "step" and "epoch" rows in the order logged

    @property
    def epochs(self) -> list[dict]:
        return [row for row in self.rows if row["kind"] == "epoch"]

    @property
    def steps(self) -> list[dict]:
        return [row for row in self.rows if row["kind"] == "step"]

    @property
    def last_step(self) -> int | None:
        steps = [row["step"] for row in self.rows if row.get("step") is not None]
        return max(steps) if steps else None

    def require_metrics(self) -> dict:
        if self.metrics is None:
            fix = (
                "wait for it"
                if self.status == run_dir.RUNNING
                else "resume it with `pipeline train-student --resume --out " + str(self.path) + "`"
            )
            raise PipelineError(
                f"run {self.name} ({self.path}) has no {run_dir.METRICS}: it is {self.status} at step "
                f"{self.last_step}, not finished. {fix[0].upper() + fix[1:]}."
            )
        return self.metrics


def _iso_mtime(path: Path | ObjectPath) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).isoformat(timespec="seconds")


def read_cache_entry(path: Path | ObjectPath) -> CacheEntry:
    """One cache directory as it is on disk now: its status, and its manifest when complete and readable."""
    status, manifest, problem = "incomplete", None, ""
    if (path / fmt.MANIFEST).is_file():
        try:
            manifest = fmt.open_cache(path).manifest
            missing = [s["file"] for s in manifest["shards"] if not (path / s["file"]).is_file()]
            status, problem = ("missing shards", ", ".join(missing)) if missing else ("complete", "")
        except CacheError as exc:
            status, problem = "unreadable", str(exc)
    return CacheEntry(path.name, path, status, manifest, storage.tree_bytes(path), problem)


def scan_caches(root: Path | ObjectPath) -> list[CacheEntry]:
    """Every directory directly under ``root``, oldest first, each with its status."""
    if not root.is_dir():
        return []
    entries = [read_cache_entry(p) for p in sorted(root.iterdir()) if p.is_dir()]
    return sorted(entries, key=lambda e: (e.manifest or {}).get("created") or _iso_mtime(e.path))


def _key_of(ref: str, keys: set[str]) -> str | None:
    """The cache key a run's reference (path, key or prefix) named, if it is still in the catalog."""
    if not ref:
        return None
    name = Path(ref).name
    if name in keys:
        return name
    matches = [k for k in keys if k.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def scan_runs(root: Path | ObjectPath, cache_keys: set[str], unreadable: list[str] | None = None) -> list[RunEntry]:
    """Every directory under ``root`` holding a run's config.json (not looking inside a run for more runs).
    ``unreadable`` collects, one line each, the run directories left out because their files cannot be read."""
    runs: list[RunEntry] = []
    if not root.is_dir():
        return runs
    for path, dirnames, _ in storage.walk(root):
        dirnames.sort()
        if not run_dir.is_run(path):
            continue
        dirnames.clear()  # a run's subdirectories are part of it, not runs of their own
        try:
            saved = run_dir.read_config(path)
            metrics = run_dir.read_metrics(path)
        except (PipelineError, ValueError) as exc:
            if unreadable is not None:  # not a run this pipeline wrote, or one damaged since: left out, and said
                unreadable.append(f"{path}: {str(exc).splitlines()[0][:200]}")
            continue
        config = saved["config"]
        trained = [c["key"] for c in saved.get("caches", []) if isinstance(c, dict) and "key" in c]
        name = path.relative_to(root).as_posix() if path != root else path.name
        runs.append(
            RunEntry(
                name,
                path,
                saved,
                metrics,
                trained,
                _key_of(config.get("eval_cache", ""), cache_keys),
                run_dir.status(path),
                run_dir.read_rows(path),
            )
        )
    return runs


def _cache_row(entry: CacheEntry, uses: int) -> dict:
    m = entry.manifest or {}
    teacher, dataset, probe = m.get("teacher", {}), m.get("dataset", {}), m.get("fidelity") or {}
    return {
        "key": entry.key,
        "status": entry.status,
        "problem": entry.reason or None,
        "complete": entry.status == "complete",
        "path": str(entry.path),
        "teacher": teacher.get("name"),
        "teacher_sha256": teacher.get("sha256"),
        "kind": teacher.get("kind"),
        "num_classes": teacher.get("num_classes"),
        "dataset_path": dataset.get("path"),
        "dataset_fingerprint": dataset.get("fingerprint"),
        "dataset_rows": dataset.get("num_rows"),
        "target_format": m.get("target_format"),
        "targets": _describe_targets(m),
        "top_k": m.get("top_k"),
        "encoding": m.get("encoding", "fp32") if m else None,
        "top_p": m.get("top_p"),
        "min_k": m.get("min_k"),
        "temperature": m.get("temperature"),
        "hidden": sorted(m.get("hidden", {})) if m else None,
        "num_positions": m.get("num_positions"),
        "num_shards": len(m["shards"]) if m else len(list(entry.path.glob("shard-*.parquet"))),
        "bytes_on_disk": entry.bytes_on_disk,
        "created": m.get("created") or _iso_mtime(entry.path),
        "probe_positions": probe.get("positions"),
        "probe_kl_mean": probe.get("kl_mean"),
        "probe_kl_max": probe.get("kl_max"),
        "probe_entropy_mean": probe.get("entropy_mean"),
        "probe_top1_mean": probe.get("top1_prob_mean"),
        "probe_tail_mass_mean": probe.get("tail_mass_mean"),
        "runs": uses,
    }


def _describe_targets(m: dict) -> str | None:
    """The format's own words for what each position holds; None for a cache whose manifest could not be read."""
    if not m:
        return None
    try:
        return format_of(m).describe(m)
    except (CacheError, KeyError):  # a manifest of a format this version does not know
        return m.get("target_format")


def _run_row(run: RunEntry) -> dict:
    c, m = run.config["config"], run.metrics or {}
    numeric = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "run": run.name,
        "status": run.status,
        "complete": run.metrics is not None,
        "last_step": run.last_step,
        "path": str(run.path),
        "method": c.get("method"),
        "student": c.get("student"),
        "alpha": c.get("alpha"),
        "temperature": m.get("temperature", c.get("temperature")),
        "epochs": m.get("epochs", c.get("epochs")),
        "data": c.get("data"),
        "eval_data": c.get("eval_data") or None,
        "cache_keys": run.cache_keys,
        "eval_cache_key": run.eval_cache_key,
        "student_parameters": run.config.get("student_parameters"),
        "train_seconds": m.get("train_seconds"),
        "test_accuracy": m.get("test_accuracy"),
        "test_agreement": m.get("test_agreement"),
        "test_kl": m.get("test_kl"),
        "test_perplexity": m.get("test_perplexity"),
        "metrics": numeric,
        "finished": _iso_mtime(run.path / run_dir.METRICS) if run.metrics is not None else None,
    }


def _rows_table(runs: list[RunEntry], kind: str) -> pa.Table:
    """The runs' metrics.csv rows of one kind ("epoch" or "step"), each logged column a float column."""
    rows = [{"run": r.name, **row} for r in runs for row in r.rows if row["kind"] == kind]
    fixed = [("run", pa.string()), ("step", pa.int64()), ("epoch", pa.int64()), ("stage", pa.string())]
    names = list(dict.fromkeys(k for row in rows for k in row if k not in {n for n, _ in fixed} | {"kind"}))
    schema = pa.schema(fixed + [(n, pa.float64()) for n in names])
    return pa.Table.from_pylist(rows, schema=schema)


class Catalog:
    """The caches and runs on disk as DuckDB views; build one per command and drop it afterwards."""

    def __init__(
        self, cache_root: str | Path | None = None, runs_root: str | Path | None = None, positions: bool = False
    ):
        self.cache_root = storage.location(cache_root or default_cache_root())
        self.runs_root = storage.location(runs_root or default_runs_root())
        for root in (self.cache_root, self.runs_root):
            if isinstance(root, ObjectPath):
                root.check_bucket()  # a mistyped bucket is an error, not an empty catalog
        self.caches = scan_caches(self.cache_root)
        keys = {c.key for c in self.caches}
        self.unreadable_runs: list[str] = []
        self.runs = scan_runs(self.runs_root, keys, self.unreadable_runs)
        self.con = duckdb.connect()
        uses = [(r.name, k, "train") for r in self.runs for k in r.cache_keys]
        uses += [(r.name, r.eval_cache_key, "eval") for r in self.runs if r.eval_cache_key]
        users = {k: len({run for run, key, _ in uses if key == k}) for k in keys}
        self._tables = {
            "caches": pa.Table.from_pylist([_cache_row(c, users[c.key]) for c in self.caches], schema=CACHE_SCHEMA),
            "shards": pa.Table.from_pylist(
                [
                    {
                        "cache_key": c.key,
                        "file": s["file"],
                        "rows": s["rows"],
                        "bytes": s["bytes"],
                        "sha256": s["sha256"],
                        "present": (c.path / s["file"]).is_file(),
                    }
                    for c in self.caches
                    if c.manifest
                    for s in c.manifest["shards"]
                ],
                schema=SHARD_SCHEMA,
            ),
            "runs": pa.Table.from_pylist([_run_row(r) for r in self.runs], schema=RUN_SCHEMA),
            "run_caches": pa.Table.from_pylist(
                [dict(zip(("run", "cache_key", "role"), u)) for u in uses], schema=RUN_CACHE_SCHEMA
            ),
            "epochs": _rows_table(self.runs, "epoch"),
            "steps": _rows_table(self.runs, "step"),
        }
        for name, table in self._tables.items():
            self.con.register(name, table)
        if positions:
            self._create_positions_view()

    def _create_positions_view(self) -> None:
        selects = [self.positions_sql(c) for c in self.caches if c.status == "complete"]
        empty = (
            "SELECT NULL::VARCHAR AS cache_key, NULL::BIGINT AS id, NULL::INTEGER AS position, "
            f"{view_columns(None)} WHERE false"
        )
        try:
            self.con.execute("CREATE VIEW positions AS " + (" UNION ALL ".join(selects) if selects else empty))
        except duckdb.Error as exc:
            raise self._shard_fault(exc) or CacheError(
                f"cannot read the caches' shards: {exc}. Check them with `pipeline caches verify`."
            ) from exc

    def _shard_fault(self, exc: duckdb.Error) -> CacheError | None:
        """The cache behind a DuckDB error that names one of its shard files, with its own verdict and fix."""
        for entry in self.caches:
            if entry.status == "complete" and any(str(p) in str(exc) for p in entry.shard_files()):
                try:
                    fmt.open_cache(entry.path).verify(checksums=False)  # footers only: cheap
                except CacheError as fault:
                    return fault
        return None

    def positions_sql(self, entry: CacheEntry) -> str:
        """One cache's positions with its key as a literal column (ids keep their type; mixed types become VARCHAR)."""
        target_format = format_of(entry.manifest)
        source = target_format.sql_source(self.parquet_source(entry.shard_files(), f"shards_{entry.key}"))
        return f"SELECT '{entry.key}' AS cache_key, id, position, {view_columns(target_format)} FROM {source}"

    def parquet_source(self, files: list[Path | ObjectPath], name: str) -> str:
        """What DuckDB scans for these Parquet files (all local, or all on one object store): read_parquet over
        local files, or an Arrow dataset registered as ``name``, streamed through pyarrow's filesystem (DuckDB's
        own httpfs extension would need a download)."""
        if not files or not isinstance(files[0], ObjectPath):
            return "read_parquet([" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in files) + "])"
        try:
            self.con.register(name, pads.dataset([p.path for p in files], filesystem=files[0].fs, format="parquet"))
        except (OSError, pa.ArrowException) as exc:
            raise PipelineError(
                f"cannot read {files[0].parent}: {exc}. Check the files (caches: `pipeline caches verify`)."
            ) from exc
        return name

    def sql(self, query: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        """Run SQL over the views: (column names, rows). A DuckDB error comes back as its own message."""
        if not query.strip():
            raise PipelineError('the SQL is empty: give a query, e.g. "SELECT * FROM caches"')
        try:
            result = self.con.execute(query, params or [])
        except duckdb.Error as exc:
            raise self._shard_fault(exc) or PipelineError(str(exc)) from exc
        if result.description is None:
            return [], []
        return [d[0] for d in result.description], result.fetchall()

    def statistics(self, entry: CacheEntry) -> dict:
        """Distribution statistics over every position of one complete cache, computed by DuckDB over its shards
        (which ones, and how: its target format's statistics_sql)."""
        query, names, _ = format_of(entry.manifest).statistics_sql(self.positions_sql(entry), entry.manifest)
        return self._distributions(query, names)

    def _distributions(self, per_position: str, names: dict[str, str]) -> dict:
        """count, then mean / min / quantiles / max of each column of ``per_position`` (SQL), under ``names``."""
        aggregates = ", ".join(f"avg({n}), min({n}), quantile_cont({n}, {list(_QUANTILES)}), max({n})" for n in names)
        _, rows = self.sql(f"SELECT count(*), {aggregates} FROM ({per_position})")
        row = rows[0]
        out: dict = {"positions": row[0]}
        for i, name in enumerate(names.values()):
            mean, lo, qs, hi = row[1 + 4 * i : 5 + 4 * i]
            out[name] = {
                "mean": mean,
                "min": lo,
                **{f"p{round(q * 100):02d}": v for q, v in zip(_QUANTILES, qs or [])},
                "max": hi,
            }
        return out

    # -- lookups ------------------------------------------------------------------------------------------
    def cache(self, ref: str) -> CacheEntry:
        """A cache by key, unique key prefix or path (``stages.cache_format.resolve_cache``)."""
        path = fmt.resolve_cache(ref, self.cache_root).resolve()
        for entry in self.caches:
            if entry.path.resolve() == path:
                return entry
        return read_cache_entry(path)  # a cache given by its path, outside the cache root

    def complete_cache(self, ref: str) -> CacheEntry:
        entry = self.cache(ref)
        if entry.status != "complete":
            raise CacheError(
                f"cache {entry.key} is {entry.status}{': ' + entry.problem if entry.problem else ''} ({entry.path})"
            )
        return entry

    def run(self, ref: str) -> RunEntry:
        """A run by path, by name under the runs root (e.g. default/kd), or by a unique trailing part of its name
        (kd)."""
        wanted = storage.location(ref).resolve()
        for run in self.runs:
            if run.path.resolve() == wanted or run.name == ref:
                return run
        matches = [r for r in self.runs if r.name.endswith("/" + ref.strip("/"))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConfigError(f"run '{ref}' is ambiguous: {', '.join(r.name for r in matches)}; give the full name")
        if storage.location(ref).is_dir():
            raise ConfigError(f"{ref} is not a run directory (no {run_dir.CONFIG}); train-student --out writes one")
        raise ConfigError(
            f"no run '{ref}' under {self.runs_root}; list runs with `pipeline runs list` (or set --runs-dir)"
        )


# -- cleaning ----------------------------------------------------------------------------------------------
def _written_by_cache_teacher(entry: CacheEntry) -> bool:
    """Named like a key and holding a file only cache-teacher writes: a directory we may delete."""
    return bool(_KEY_NAME.match(entry.key)) and any(
        (entry.path / n).exists() for n in (fmt.MANIFEST, fmt.JOURNAL, fmt.REQUEST)
    )


def remove_cache(entry: CacheEntry) -> None:
    """Delete one cache directory, unless a cache-teacher process is writing it right now."""
    if not _written_by_cache_teacher(entry):
        raise CacheError(
            f"{entry.path} does not look like a cache directory (no manifest, journal or request); not removing it"
        )
    lock = fmt.try_lock(entry.path)
    if lock is None:
        raise CacheError(f"cache {entry.key} is being written by a running cache-teacher; wait for it or stop it first")
    with lock:
        storage.rmtree(entry.path)


def collect_garbage(catalog: Catalog, dry_run: bool) -> list[tuple[CacheEntry, str]]:
    """Incomplete leftovers under the cache root, each with what was (or would be) done: removed / in use / skipped.

    Only directories named like a key and without a manifest qualify; complete caches are never touched here.
    """
    done = []
    for entry in catalog.caches:
        if entry.status != "incomplete":
            continue
        if not _KEY_NAME.match(entry.key):
            done.append((entry, "skipped: not named like a cache key"))
            continue
        if not _written_by_cache_teacher(entry):
            done.append((entry, f"skipped: holds no {fmt.REQUEST} or journal, so cache-teacher did not write it"))
            continue
        lock = fmt.try_lock(entry.path, create=not dry_run)
        if lock is None:
            done.append((entry, "skipped: a running cache-teacher holds its lock"))
            continue
        with lock:
            if not dry_run:
                storage.rmtree(entry.path)
        done.append((entry, "would remove" if dry_run else "removed"))
    return done
