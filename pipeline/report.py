"""Reports: PNG plots and a Markdown page that compare finished runs and show their teacher's cache.

``write_report(catalog, runs, out)`` writes into ``out``:

    learning_curves.png   one panel per training-loss part and per eval metric, one line per run (metrics.csv):
                          by optimizer step when every run logged per-step rows, else by epoch
    final_metrics.png     one panel per final test metric, one bar per run (metrics.json)
    reliability.png       the teacher's reliability diagram at the cache's T: confidence exp(topk_logp[1]) against
                          the accuracy of topk_ids[1] on the dataset's labels (cache joined with dataset on id)
    tail_mass.png         histogram of the cache's tail mass
    report.md             the page that ties them together, with the numbers behind each plot

A sampled cache (``--target-format sampled``) stores draws, not probabilities: both teacher plots are left out
with the reason on the page, which shows the draws' statistics instead.

The teacher plots use the first cache of the first run that has one. The cache-side numbers come from DuckDB
over the shards; matplotlib draws through the Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.catalog import CacheEntry, Catalog, RunEntry
from stages.dataset import Dataset
from stages.errors import PipelineError
from stages.formats import format_of

RELIABILITY_BINS = 10  # equal-width confidence bins of the reliability diagram
TAIL_BINS = 40  # bins of the tail-mass histogram over [0, max tail mass]
_DPI = 120
_CURVES = {  # metrics.csv column -> (panel title, y-axis label)
    "train_total": ("Training loss: total objective", "loss (nats)"),
    "train_kd": ("Training KL to the teacher at T", "KL (nats)"),
    "train_ce": ("Training cross-entropy to labels", "cross-entropy (nats)"),
    "train_hidden": ("Training hidden-state loss", "loss (per element)"),
    "eval_accuracy": ("Eval accuracy", "accuracy (fraction correct)"),
    "eval_agreement": ("Eval top-1 agreement with the teacher", "agreement (fraction)"),
    "eval_kl": ("Eval KL to the teacher at T", "KL (nats)"),
    "eval_perplexity": ("Eval perplexity", "perplexity"),
}
_FINAL = {  # metrics.json key -> (panel title, y-axis label)
    "test_accuracy": ("Test accuracy", "accuracy (fraction correct)"),
    "test_agreement": ("Test top-1 agreement with the teacher", "agreement (fraction)"),
    "test_kl": ("Test KL to the teacher at T", "KL (nats)"),
    "test_perplexity": ("Test perplexity", "perplexity"),
}
_FRACTIONS = {"eval_accuracy", "eval_agreement", "test_accuracy", "test_agreement"}  # plotted on [0, 1]


def run_label(run: RunEntry) -> str:
    c = run.config["config"]
    kind = "scratch" if not c.get("alpha") else f"{c.get('method')}, α={c.get('alpha'):g}"
    return f"{run.name} ({kind})"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)


def _colors(n: int) -> list:
    return [f"C{i % 10}" for i in range(n)]


def plot_learning_curves(runs: list[RunEntry], path: Path) -> list[str]:
    """One panel per metric that any run logged; returns the columns plotted.

    By step when every run has per-step rows: training losses from the "step" rows, eval metrics from the epoch
    rows at the step each epoch ended. Otherwise (runs from before per-step logging) by epoch.
    """
    by_step = all(r.steps for r in runs)
    columns = [c for c in _CURVES if any(row.get(c) is not None for r in runs for row in r.rows)]
    if not columns:
        raise PipelineError(
            f"the runs {', '.join(r.name for r in runs)} logged no epochs (metrics.csv is empty or missing)"
        )
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    fig.suptitle(f"Learning curves per {'optimizer step' if by_step else 'epoch'}", fontsize=14)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, color in zip(runs, _colors(len(runs))):
            source = run.steps if by_step and column.startswith("train_") else run.epochs
            xs = [row["step" if by_step else "epoch"] for row in source]
            ys = [np.nan if row.get(column) is None else row[column] for row in source]
            if not np.all(np.isnan(ys)):
                ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, markersize=3, color=color, label=run_label(run))
        title, ylabel = _CURVES[column]
        ax.set_title(title)
        ax.set_xlabel("optimizer step" if by_step else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if column in _FRACTIONS:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return columns


def plot_final_metrics(runs: list[RunEntry], path: Path) -> list[str]:
    """One panel per final test metric, a labelled bar per run; returns the metrics plotted."""
    metrics = [m for m in _FINAL if any((r.metrics or {}).get(m) is not None for r in runs)]
    if not metrics:
        return []
    fig = Figure(figsize=(max(4.5, 1.6 * len(runs) + 2) * len(metrics), 4.4), layout="constrained")
    fig.suptitle("Final test metrics per run", fontsize=14)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        values = [np.nan if run.metrics.get(metric) is None else run.metrics[metric] for run in runs]
        bars = ax.bar(range(len(runs)), np.nan_to_num(values), color=_colors(len(runs)))
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.4g}" for v in values], padding=2)
        ax.set_xticks(range(len(runs)), [run_label(r) for r in runs], rotation=20, ha="right", fontsize=8)
        title, ylabel = _FINAL[metric]
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("run")
        top = np.nanmax(values) if not np.all(np.isnan(values)) else 1.0
        ax.set_ylim(0, 1.1 if metric in _FRACTIONS else top * 1.15 or 1.0)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return metrics


def reliability(catalog: Catalog, entry: CacheEntry, bins: int = RELIABILITY_BINS) -> tuple[list[dict], str]:
    """Per confidence bin: positions, mean confidence, accuracy. An empty list comes with the reason."""
    m = entry.manifest
    if m["teacher"]["kind"] != "classifier":
        return [], "the cache is token-level: its dataset has no per-example labels to score the teacher against"
    if not format_of(m).exact_logp:
        return [], (
            f"the cache holds {m['samples']} draws per example, not the teacher's probabilities, so it has no exact "
            "top-1 confidence (a draw frequency is noisy and biased upward); a top-k cache of the same teacher has one"
        )
    try:
        data = Dataset(m["dataset"]["path"])
    except PipelineError as exc:
        return [], f"the cache's dataset cannot be read ({exc})"
    if not data.has_labels:
        return [], f"the cache's dataset {data.path} has no label column"
    _, rows = catalog.sql(f"""
        SELECT least(floor(conf * {bins}), {bins - 1})::INTEGER AS bin, count(*) AS n, avg(conf) AS confidence,
               avg((pred = label)::DOUBLE) AS accuracy
        FROM (SELECT id, exp(topk_logp[1]::DOUBLE) AS conf, topk_ids[1] AS pred FROM ({catalog.positions_sql(entry)})) c
        JOIN (SELECT id, "{data.label_column}" AS label FROM {catalog.parquet_source(data.files, f"data_{entry.key}")}
              WHERE "{data.label_column}" IS NOT NULL) d USING (id)
        GROUP BY bin ORDER BY bin""")
    if not rows:
        return [], f"no row of the cache's dataset {data.path} has a label"
    return [dict(zip(("bin", "n", "confidence", "accuracy"), r)) for r in rows], ""


def plot_reliability(entry: CacheEntry, table: list[dict], path: Path, bins: int = RELIABILITY_BINS) -> dict:
    n = sum(r["n"] for r in table)
    accuracy = sum(r["n"] * r["accuracy"] for r in table) / n
    ece = sum(r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in table)
    m = entry.manifest
    width = 1 / bins
    centres = [(r["bin"] + 0.5) * width for r in table]
    fig = Figure(figsize=(7.2, 7.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(
        centres,
        [r["accuracy"] for r in table],
        width=width * 0.95,
        color="C0",
        alpha=0.7,
        edgecolor="black",
        label="accuracy in bin",
    )
    top.plot(
        [r["confidence"] for r in table],
        [r["accuracy"] for r in table],
        "o",
        color="C3",
        label="(mean confidence, accuracy)",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_title(
        fontsize=11,
        label=f"Teacher reliability: {m['teacher']['name']} at T={m['temperature']:g}\n"
        f"cache {entry.key}, {n} labelled examples, accuracy {accuracy:.3f}, ECE {ece:.3f}",
    )
    top.set_ylabel("accuracy of the top-1 class (fraction)")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.15)  # headroom above accuracy 1 for the legend, which would hide bars anywhere else
    top.set_yticks(np.linspace(0, 1, 6))
    top.legend(loc="upper center", ncols=3, fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centres, [r["n"] for r in table], width=width * 0.95, color="C7", edgecolor="black")
    bottom.set_xlabel(f"confidence: teacher's top-1 probability at T={m['temperature']:g}")
    bottom.set_ylabel("examples")
    bottom.grid(alpha=0.3)
    _save(fig, path)
    return {"examples": n, "accuracy": accuracy, "ece": ece}


def plot_tail_mass(catalog: Catalog, entry: CacheEntry, path: Path, bins: int = TAIL_BINS) -> dict:
    source = catalog.positions_sql(entry)
    _, [(n, mean, top)] = catalog.sql(
        f"SELECT count(*), avg(tail_mass::DOUBLE), max(tail_mass::DOUBLE) FROM ({source})"
    )
    m = entry.manifest
    k, vocab = m["top_k"], m["teacher"]["num_classes"]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    if top > 0:
        w = top / bins
        _, rows = catalog.sql(
            f"SELECT least(floor(tail_mass / {w}), {bins - 1})::INTEGER AS b, count(*) "
            f"FROM ({source}) GROUP BY b ORDER BY b"
        )
        ax.bar([(b + 0.5) * w for b, _ in rows], [c for _, c in rows], width=w * 0.95, color="C1", edgecolor="black")
        ax.set_xlim(0, top * 1.02)
    else:
        ax.bar([0], [n], width=0.02, color="C1", edgecolor="black")
        ax.set_xlim(-0.05, 1)
        ax.annotate(
            f"all {n} positions have tail mass 0\n(k = {k} of {vocab} classes: nothing lies outside the top-k)",
            xy=(0.02, n),
            xytext=(0.25, n * 0.6),
            arrowprops={"arrowstyle": "->"},
        )
    ax.set_title(
        f"Tail mass of cache {entry.key} (k={k} of V={vocab}, T={m['temperature']:g})\n"
        f"mean {mean:.3g}, max {top:.3g}, {n} positions"
    )
    ax.set_xlabel("tail mass: teacher probability outside the cached top-k")
    ax.set_ylabel("positions")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return {"positions": n, "mean": mean, "max": top}


def _draw_lines(catalog: Catalog, entry: CacheEntry) -> list[str]:
    """A sampled cache's statistics over every position, in place of the tail mass it does not store."""
    stats = catalog.statistics(entry)
    names = {"distinct_ids": "distinct ids drawn", "top_draw_frequency": "top draw's frequency"}
    lines = [
        f"Draws per position: {entry.manifest['samples']} (a sampled cache stores no tail mass), over "
        f"{stats['positions']} positions:",
        "",
        "| statistic | " + " | ".join(stats["distinct_ids"]) + " |",
        "|---" * (1 + len(stats["distinct_ids"])) + "|",
    ]
    lines += [
        f"| {label} | " + " | ".join(_fmt(v) for v in stats[name].values()) + " |" for name, label in names.items()
    ]
    return lines


def _teacher_cache(catalog: Catalog, runs: list[RunEntry]) -> tuple[CacheEntry | None, str]:
    for run in runs:
        if not run.cache_keys:
            continue
        key = run.cache_keys[0]
        found = [c for c in catalog.caches if c.key == key]
        if not found or found[0].status != "complete":
            state = found[0].status if found else f"not under {catalog.cache_root}"
            return None, f"cache {key} of run {run.name} is {state}; teacher plots skipped"
        return found[0], ""
    return None, "no run given used a cache (all trained from scratch); teacher plots skipped"


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(catalog: Catalog, runs: list[RunEntry], out: Path) -> Path:
    """Write the plots and report.md into ``out``; every run must have finished (metrics.json)."""
    for run in runs:
        run.require_metrics()
    out.mkdir(parents=True, exist_ok=True)
    finals = [m for m in _FINAL if any(r.metrics.get(m) is not None for r in runs)]
    lines = [
        f"# Distillation report: {', '.join(r.name for r in runs)}",
        "",
        f"Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC from the run directories under "
        f"`{catalog.runs_root}` and the caches under `{catalog.cache_root}`.",
        "",
        "## Runs",
        "",
        "| " + " | ".join(["run", "method", "student", "α", "T", "epochs", "train cache(s)", *finals]) + " |",
        "|---" * (7 + len(finals)) + "|",
    ]
    for r in runs:
        c = r.config["config"]
        method = c.get("method") if c.get("alpha") else "scratch (α=0)"
        cells = [r.name, method, f"`{c.get('student')}`", c.get("alpha"), _fmt(r.metrics.get("temperature"))]
        cells += [r.metrics.get("epochs"), ", ".join(r.cache_keys) or "—", *(_fmt(r.metrics.get(m)) for m in finals)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    plot_learning_curves(runs, out / "learning_curves.png")
    lines += [
        "",
        "## Learning curves",
        "",
        "Training-loss parts (per logged step, or per epoch for older runs) and eval metrics per epoch, from each "
        "run's metrics.csv.",
        "",
        "![learning curves](learning_curves.png)",
    ]
    if plot_final_metrics(runs, out / "final_metrics.png"):
        lines += ["", "## Final metrics", "", "![final test metrics](final_metrics.png)"]
    entry, note = _teacher_cache(catalog, runs)
    lines += ["", "## Teacher (from its cache)", ""]
    if entry is None:
        lines.append(f"_{note}._")
    else:
        m = entry.manifest
        target_format = format_of(m)
        targets = f"{target_format.describe(m)} ({target_format.name} targets)"
        lines += [
            f"Cache `{entry.key}`: teacher `{m['teacher']['name']}` (sha256 {m['teacher']['sha256'][:12]}), "
            f"{targets} at T={m['temperature']:g}, {m['num_positions']} positions, dataset `{m['dataset']['path']}`.",
            "",
        ]
        table, why = reliability(catalog, entry)
        if table:
            s = plot_reliability(entry, table, out / "reliability.png")
            lines += [
                f"Reliability at the cache's T={m['temperature']:g} "
                "(confidence is the top-1 probability at that temperature, "
                f"so T > 1 reads under-confident): accuracy {s['accuracy']:.4f}, ECE {s['ece']:.4f} "
                f"over {s['examples']} labelled examples.",
                "",
                "![teacher reliability diagram](reliability.png)",
                "",
                "| confidence bin | examples | mean confidence | accuracy |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {r['bin'] / RELIABILITY_BINS:.1f}–{(r['bin'] + 1) / RELIABILITY_BINS:.1f} | {r['n']} | "
                f"{r['confidence']:.4f} | {r['accuracy']:.4f} |"
                for r in table
            ]
        else:
            lines.append(f"_Reliability diagram skipped: {why}._")
        if not target_format.has_tail:
            lines += ["", *_draw_lines(catalog, entry)]
        else:
            t = plot_tail_mass(catalog, entry, out / "tail_mass.png")
            lines += [
                "",
                f"Tail mass (probability outside the cached top-k): mean {t['mean']:.4g}, max {t['max']:.4g} "
                f"over {t['positions']} positions.",
                "",
                "![tail-mass histogram](tail_mass.png)",
            ]
    page = out / "report.md"
    page.write_text("\n".join(lines) + "\n")
    return page
