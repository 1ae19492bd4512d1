"""Catalog commands: ``caches`` (list, show, verify, commit, rm, gc), ``runs`` (list, compare), ``query``, ``report``.

Each parses its options, builds a fresh ``Catalog`` from the files on disk (pipeline/catalog.py says why nothing
is stored), calls it, and prints. ``pipeline.cli`` calls ``register(main)``.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import math
from pathlib import Path

import click

from pipeline.catalog import Catalog, collect_garbage, remove_cache
from pipeline.cli_base import errors_to_click, log
from stages import cache_format as fmt
from stages.errors import CacheError
from stages.formats import format_of

FORMATS = ("table", "csv", "json")


def _roots(fn):
    fn = click.option(
        "--runs-dir",
        type=click.Path(file_okay=False),
        help="Runs root, a directory or s3://... ($KD_RUNS_DIR or runs/).",
    )(fn)
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False),
        help="Cache root, a directory or s3://... (default $KD_CACHE_DIR or ~/.cache/kd-pipeline).",
    )(fn)


def _format_option(fn):
    return click.option(
        "--format",
        "out_format",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="table for reading; csv or json for other tools.",
    )(fn)


def _plain(v):
    """A value as JSON/CSV can hold it: Decimal -> float, NaN -> None, anything else exotic -> str."""
    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def _cell(v) -> str:
    v = _plain(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v)


def render(columns: list[str], rows: list[tuple], out_format: str = "table") -> str:
    """Rows as an aligned text table (numbers right-aligned), CSV, or a JSON list of objects."""
    if out_format == "json":
        return json.dumps([dict(zip(columns, map(_plain, row))) for row in rows], indent=2)
    if out_format == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(
            [[json.dumps(_plain(v)) if isinstance(v, (list, dict)) else _cell(v) for v in row] for row in rows]
        )
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(r[i], (int, float, decimal.Decimal)) or r[i] is None for r in rows) for i in range(len(columns))
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _drop_empty(columns: list[str], rows: list[tuple], keep: int = 1) -> tuple[list[str], list[tuple]]:
    """Drop the columns no row fills (after the first ``keep``), so a list shows only what the runs logged."""
    used = [i for i, _ in enumerate(columns) if i < keep or any(r[i] is not None and r[i] != [] for r in rows)]
    return [columns[i] for i in used], [tuple(r[i] for i in used) for r in rows]


# -- caches ------------------------------------------------------------------------------------------------
@click.group()
def caches() -> None:
    """Find, inspect, verify and clean the caches under the cache root."""


_CACHE_LIST_SQL = (
    "\n"
    "    SELECT key, teacher || ' ' || teacher_sha256[1:8] AS teacher,"
    " parse_filename(dataset_path) || ' ' || dataset_fingerprint[1:8] AS dataset,\n"
    "           kind, top_k AS k, targets, temperature AS T, num_positions AS positions,\n"
    "           format_bytes(bytes_on_disk) AS size, replace(created[1:16], 'T', ' ') AS created, status, runs,\n"
    "           problem\n"
    "    FROM caches ORDER BY created, key"
)


@caches.command("list")
@_roots
@_format_option
@errors_to_click
def caches_list(cache_dir, runs_dir, out_format) -> None:
    """One row per cache: key, teacher, dataset, kind, k, T, positions, size, created, status, runs that used it,
    and the problem of a cache that is not sound (the first line of what `caches verify` says)."""
    catalog = Catalog(cache_dir, runs_dir)
    if not catalog.caches:
        log(
            f"no caches under {catalog.cache_root} "
            "(choose another with --cache-dir or $KD_CACHE_DIR; create one with `pipeline cache-teacher`)"
        )
        return
    columns, rows = catalog.sql(_CACHE_LIST_SQL)
    # problem: why a cache is unreadable or which shards are missing; a column only when some cache has one
    click.echo(render(*_drop_empty(columns, rows, keep=len(columns) - 1), out_format))


def _stats_lines(stats: dict) -> list[str]:
    names = {
        "tail_mass": "tail mass",
        "top1_prob": "top-1 probability",
        "kept_ids": "ids kept (top-p)",
        "entropy_lower": "entropy >= (bound, nats)",
        "entropy_upper": "entropy <= (bound, nats)",
        "distinct_ids": "distinct ids drawn",
        "top_draw_frequency": "top draw's frequency",
    }
    present = {name: label for name, label in names.items() if name in stats}
    columns = ["statistic"] + list(stats[next(iter(present))])
    rows = [tuple([label] + list(stats[name].values())) for name, label in present.items()]
    return render(columns, rows).splitlines()


@caches.command("show")
@click.argument("key")
@_roots
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest (without its shard list) and the statistics as JSON."
)
@errors_to_click
def caches_show(key, cache_dir, runs_dir, as_json) -> None:
    """A cache's manifest, its fidelity probe, and statistics over all its positions (DuckDB over the shards)."""
    catalog = Catalog(cache_dir, runs_dir)
    entry = catalog.complete_cache(key)
    m = entry.manifest
    stats = catalog.statistics(entry)
    users = catalog.sql("SELECT DISTINCT run FROM run_caches WHERE cache_key = ? ORDER BY run", [entry.key])[1]
    if as_json:
        shown = {k: v for k, v in m.items() if k != "shards"} | {
            "num_shards": len(m["shards"]),
            "statistics": stats,
            "runs": [u[0] for u in users],
        }
        click.echo(json.dumps(_plain(shown), indent=2))
        return
    t, d, probe = m["teacher"], m["dataset"], m.get("fidelity") or {}
    target_format = format_of(m)
    what = target_format.describe(m)
    lines = [
        f"cache      {entry.key}  ({entry.status})",
        f"path       {entry.path}",
        f"teacher    {t['name']}  sha256 {t['sha256'][:12]}  {t['kind']}, {t['num_classes']} classes/vocabulary, "
        f"output '{t['logits_output']}'",
        f"dataset    {d['path']}  fingerprint {d['fingerprint'][:12]}  {d['num_rows']} rows",
        f"targets    {target_format.name} v{m['format_version']}: {what} at T={m['temperature']:g}; "
        f"hidden: {', '.join(f'{n} {s}' for n, s in m.get('hidden', {}).items()) or 'none'}",
        f"positions  {m['num_positions']} in {len(m['shards'])} shard(s), {m['bytes']} bytes "
        f"({m['bytes_per_position']:.1f} bytes/position)",
        f"created    {m.get('created')}  on {', '.join(m.get('providers', []))}  "
        f"in {m.get('run', {}).get('seconds', float('nan')):.2f}s",
        f"runs       {len(users)}" + (f" ({', '.join(u[0] for u in users)})" if users else ""),
        "",
    ]
    if probe:
        lines += [
            f"fidelity probe (manifest; the first {probe['positions']} positions, "
            "dense teacher vs. cache, measured at cache time):",
            *(
                [
                    f"  KL(teacher || reconstructed from cache)  mean {probe['kl_mean']:.3g}  "
                    f"max {probe['kl_max']:.3g} nats"
                ]
                if "kl_mean" in probe
                else []
            ),
            *(
                [
                    f"  KL(top-k + tail || {probe['encoding']}-decoded)  mean {probe['encoding_kl_mean']:.3g}  max "
                    f"{probe['encoding_kl_max']:.3g} nats, max |delta log p| {probe['encoding_max_abs_dlogp']:.3g}"
                ]
                if "encoding_kl_mean" in probe
                else []
            ),
            f"  teacher entropy at T (dense, exact)      mean {probe['entropy_mean']:.4f} nats",
            f"  top-1 probability                        mean {probe['top1_prob_mean']:.4f}",
            f"  tail mass (outside the cached ids)       mean {probe['tail_mass_mean']:.4g}",
        ]
    else:
        lines.append("fidelity probe: none recorded (cached with --probe-positions 0)")
    how = target_format.statistics_sql("", m)[2]
    lines += ["", f"over all {stats['positions']} positions (DuckDB over the shards; {how}):"]
    lines += ["  " + s for s in _stats_lines(stats)]
    click.echo("\n".join(lines))


@caches.command("verify")
@click.argument("keys", nargs=-1)
@_roots
@click.option(
    "--fast", is_flag=True, help="Check the manifest against the shards' Parquet metadata only, not their sha256."
)
@errors_to_click
def caches_verify(keys, cache_dir, runs_dir, fast) -> None:
    """Check caches against their manifests: checksum, schema, row counts, list sizes, sha256 (default: all)."""
    catalog = Catalog(cache_dir, runs_dir)
    entries = [catalog.cache(k) for k in keys] if keys else catalog.caches
    if not entries:
        log(f"no caches under {catalog.cache_root}")
        return
    failed = 0
    for entry in entries:
        if not keys and entry.status == "incomplete":  # not named: a leftover, not a failure
            click.echo(
                f"skip  {entry.key}  incomplete (no manifest): "
                "resume it with the same cache-teacher command, or `pipeline caches gc`"
            )
            continue
        try:
            cache = fmt.open_cache(entry.path)
            cache.verify(checksums=not fast)
        except CacheError as exc:
            failed += 1
            click.echo(f"FAIL  {entry.key}  {exc}")
            continue
        check = "schema, row counts, list sizes" + ("" if fast else ", sha256")
        note = "" if cache.checksummed else " (no manifest checksum: written before checksums; rebuild to add one)"
        click.echo(
            f"ok    {entry.key}  {len(cache.shards)} shard(s), {cache.manifest['num_positions']} positions: "
            f"{check} match the manifest{note}"
        )
    if failed:
        raise click.ClickException(f"{failed} of {len(entries)} cache(s) failed verification")


@caches.command("export")
@click.argument("key")
@_roots
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="Parquet file to write (replaced if it exists).",
)
@errors_to_click
def caches_export(key, cache_dir, runs_dir, out) -> None:
    """Write a top-k cache's targets, decoded from any encoding, in the plain format-1 schema (id, position,
    topk_ids, topk_logp, logz, tail_mass) for other tools. Prints the file last."""
    entry = Catalog(cache_dir, runs_dir).complete_cache(key)
    cache = fmt.open_cache(entry.path)
    cache.verify(checksums=True)  # an export is a copy for other tools: check every byte it copies
    path = Path(out)
    if not path.parent.is_dir():
        raise CacheError(f"cannot write {path}: its folder {path.parent} does not exist; create it first")
    rows = fmt.export_plain(cache, path)
    log(f"exported {rows} positions of cache {entry.key} ({cache.format.describe(cache.manifest)})")
    click.echo(str(path))


@caches.command("commit")
@click.argument("key")
@_roots
@errors_to_click
def caches_commit(key, cache_dir, runs_dir) -> None:
    """Write the manifest of a cache that launcher-free workers filled, once every shard exists and verifies."""
    from stages import cache_commit

    entry = Catalog(cache_dir, runs_dir).cache(key)
    result = cache_commit.commit(entry.path, log=log)
    click.echo(str(result.path))


@caches.command("rm")
@click.argument("key")
@_roots
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@errors_to_click
def caches_rm(key, cache_dir, runs_dir, yes) -> None:
    """Remove one cache (named by key, unique key prefix or path)."""
    catalog = Catalog(cache_dir, runs_dir)
    entry = catalog.cache(key)
    users = catalog.sql("SELECT count(DISTINCT run) FROM run_caches WHERE cache_key = ?", [entry.key])[1][0][0]
    what = (
        f"cache {entry.key} ({entry.status}, {entry.bytes_on_disk} bytes{f', used by {users} run(s)' if users else ''})"
    )
    if not yes:
        click.confirm(f"Remove {what} at {entry.path}?", abort=True)
    remove_cache(entry)
    click.echo(f"removed {what}")


@caches.command("gc")
@_roots
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@errors_to_click
def caches_gc(cache_dir, runs_dir, dry_run) -> None:
    """Remove incomplete leftovers (no manifest, not being written). Complete caches are never touched."""
    catalog = Catalog(cache_dir, runs_dir)
    done = collect_garbage(catalog, dry_run)
    if not done:
        log(f"nothing to collect under {catalog.cache_root}: no incomplete caches")
        return
    for entry, action in done:
        click.echo(
            f"{action:<10}  {entry.key}  {entry.bytes_on_disk} bytes"
            if not action.startswith("skipped")
            else f"{entry.key}  {action}"
        )
    freed = sum(e.bytes_on_disk for e, a in done if a in ("removed", "would remove"))
    click.echo(f"{'would free' if dry_run else 'freed'} {freed} bytes")


# -- runs ----------------------------------------------------------------------------------------------------
@click.group()
def runs() -> None:
    """List and compare student runs (directories written by train-student --out)."""


@runs.command("list")
@_roots
@_format_option
@errors_to_click
def runs_list(cache_dir, runs_dir, out_format) -> None:
    """One row per run: status (complete / running / interrupted) and last step, configuration, final test metrics."""
    catalog = Catalog(cache_dir, runs_dir)
    for line in catalog.unreadable_runs:
        log(f"note: left out {line}")
    if not catalog.runs:
        log(
            f"no runs under {catalog.runs_root} "
            "(train-student --out writes one; choose another with --runs-dir or $KD_RUNS_DIR)"
        )
        return
    columns, rows = catalog.sql("""
        SELECT run, status, last_step, method, student, alpha, temperature AS T, epochs, test_accuracy, test_agreement,
               test_kl, test_perplexity, train_seconds, cache_keys AS caches, eval_cache_key AS eval_cache
        FROM runs ORDER BY run""")
    click.echo(render(*_drop_empty(columns, rows, keep=8), out_format))


@runs.command("compare")
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True)
@_roots
@click.option("--all", "show_all", is_flag=True, help="Show every configuration field, not only those that differ.")
@_format_option
@errors_to_click
def runs_compare(run_refs, cache_dir, runs_dir, show_all, out_format) -> None:
    """Configurations (those that differ), caches and final metrics of runs, side by side."""
    catalog = Catalog(cache_dir, runs_dir)
    chosen = [catalog.run(r) for r in run_refs]
    for r in chosen:
        if r.metrics is None:
            log(f"note: run {r.name} is {r.status} at step {r.last_step} (no metrics.json): its metrics are blank")
    configs = [r.config["config"] for r in chosen]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    shown = [
        k
        for k in keys
        if show_all or len(chosen) == 1 or len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
    ]
    rows = [("status",) + tuple(r.status for r in chosen)]
    rows += [(f"config.{k}",) + tuple(c.get(k) for c in configs) for k in shown]
    rows.append(
        ("caches",)
        + tuple(
            ", ".join(
                f"{c['key']} ({c.get('teacher')}, k={c.get('top_k')}, T={c.get('temperature')})"
                for c in r.config.get("caches", [])
            )
            or "none"
            for r in chosen
        )
    )
    rows.append(("eval_cache",) + tuple(r.eval_cache_key for r in chosen))
    rows.append(("student_parameters",) + tuple(r.config.get("student_parameters") for r in chosen))
    metric_keys = list(
        dict.fromkeys(k for r in chosen for k in (r.metrics or {}) if k not in ("cache_keys",) and k not in keys)
    )
    rows += [(k,) + tuple((r.metrics or {}).get(k) for r in chosen) for k in metric_keys]
    if not show_all and len(chosen) > 1:
        log(f"{len(keys) - len(shown)} identical configuration field(s) hidden; --all shows them")
    click.echo(render(["field"] + [r.name for r in chosen], rows, out_format))


# -- query and report -------------------------------------------------------------------------------------------
@click.command("query")
@click.argument("sql")
@_roots
@_format_option
@errors_to_click
def query(sql, cache_dir, runs_dir, out_format) -> None:
    """SQL over the views caches, shards, runs, run_caches, epochs and positions (see the README)."""
    catalog = Catalog(cache_dir, runs_dir, positions=True)
    columns, rows = catalog.sql(sql)
    if columns:
        click.echo(render(columns, rows, out_format))
    if out_format == "table":
        log(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


@click.command("report")
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Directory for the PNG plots and report.md."
)
@_roots
@errors_to_click
def report(run_refs, out, cache_dir, runs_dir) -> None:
    """Plots (learning curves, final metrics, teacher reliability, tail mass) and a Markdown page.
    Prints report.md last."""
    from pathlib import Path

    from pipeline.report import write_report

    catalog = Catalog(cache_dir, runs_dir)
    page = write_report(catalog, [catalog.run(r) for r in run_refs], Path(out))
    click.echo(str(page))


def register(group: click.Group) -> None:
    for command in (caches, runs, query, report):
        group.add_command(command)
