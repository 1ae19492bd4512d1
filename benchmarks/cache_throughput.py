"""Cache-teacher throughput against bare ONNX Runtime inference, measured side by side in one run.

The question (target: ratio >= 0.90): how much does stage one add around the teacher's own ``session.run`` --
reading Parquet, padding, top-k and the log-partition, assembling rows in dataset order, writing zstd shards,
hashing, the manifest -- for a token-level teacher with a ~50k vocabulary? And how many bytes does one cached
position take at k = 8, 32, 64?

Method:
- bare: one ORT session built by ``stages.teacher.Teacher`` (the pipeline's own session options and threads),
  run over the pipeline's own batches (shard by shard, length-grouped, padded per batch, made by
  ``ShardRunner._batches``), timing only ``session.run`` returning the full ``[batch, seq, V]`` logits. A fresh
  session each round, timed from its first call, as the pipeline's shard loop runs on a fresh session from its
  first call: both pay ONNX Runtime's warm-up (the first call sizes its memory arena), which is printed. (Until
  2026-11-30 the bare session was warmed by one untimed call and the pipeline's was not: ~1.5 % against it.)
- bare end to end: what a user's own script pays for the same logits, a fresh ``onnxruntime.InferenceSession``
  from the file, ``session.run`` over the same batches and the session's release; the pipeline's end-to-end
  time is compared with it.
- pipeline: ``stages.cache_teacher.run`` end to end into a fresh cache directory each time (never a cache hit).
  "end to end" is the wall time of the call, "steady" is the manifest's shard-loop time (without loading and
  hashing the teacher, creating the session, fingerprinting the dataset), which is what a long run approaches.
- rounds are interleaved (bare, pipeline k=8, k=32, k=64, then pipeline first, bare, ...: ABBA) so load from
  other processes, and the machine's speed drifting, fall on both alike; the medians, their ratio, the
  per-round ratios and their median ("paired") are printed.
- top-k placement: ``--postprocess host`` against ``graph`` (TopK + ReduceLogSumExp appended to the ONNX graph),
  each also without the fidelity probe (``-noprobe``: in graph mode the probe asks the session for the dense
  logits of the first batch once more), plus bare ORT; each run is its own subprocess, which reports its own
  peak RSS (VmHWM); ``--placement-rounds`` repeats the set, interleaved.

Throughput counts real (non-padding) token positions.

    python benchmarks/cache_throughput.py                                   # synthetic 50,257-vocab teacher
    python benchmarks/cache_throughput.py --teacher data/smollm2/teacher.onnx --positions 4000
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

from stages import cache_teacher
from stages.config import CacheTeacherConfig
from stages.dataset import Dataset, column_to_array
from stages.shard_runner import ShardRunner
from stages.teacher import TOKEN, Teacher

KS = (8, 32, 64)
PLACEMENTS = ("bare", "host", "graph", "host-noprobe", "graph-noprobe")


# -- teacher ------------------------------------------------------------------------------------------------
def build_synthetic_teacher(path: Path, vocab: int, width: int, layers: int, seed: int = 0) -> None:
    """input_ids, attention_mask [B, S] -> Gather(emb) * mask -> layers x (h + relu(h @ W)) -> h @ head [B, S, V].

    Its cost per position is almost all in the head (2·d·V FLOPs), like a small LM's output layer alone: the
    cheapest teacher a 50k vocabulary allows, so the pipeline's V-sized passes weigh the most here.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (vocab, width)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.normal(0, 2 / np.sqrt(width), (width, vocab)).astype(np.float32), "head"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h0_raw"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["h0_raw", "mask3"], ["h0"]),
    ]
    for i in range(layers):
        inits.append(
            numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32), f"w{i}")
        )
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"pre{i}"]),
            helper.make_node("Relu", [f"pre{i}"], [f"act{i}"]),
            helper.make_node("Add", [f"h{i}", f"act{i}"], [f"h{i + 1}"]),
        ]
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "head"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "synthetic_lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def weight_flops_per_position(path: Path) -> float:
    """2·K·N for every MatMul/Gemm against a weight (an initializer, or a Transpose of one, as tied heads are).

    Attention score/value products (which grow with the sequence) and element-wise ops are not counted.
    """
    model = onnx.load(path, load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in dims}
    flops = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            weight = node.input[1] if node.input[1] in dims else transposed.get(node.input[1])
            if weight is not None and len(dims[weight]) == 2:
                flops += 2 * dims[weight][0] * dims[weight][1]
    return float(flops)


# -- dataset ------------------------------------------------------------------------------------------------
def text_tokens(tokenizer_json: Path) -> np.ndarray:
    """English prose to feed a real LM: the standard library's docstrings, tokenized with the teacher's tokenizer."""
    import importlib

    from tokenizers import Tokenizer

    docs = []
    for name in (
        "argparse",
        "collections",
        "dataclasses",
        "json",
        "pathlib",
        "subprocess",
        "threading",
        "logging",
        "unittest",
        "email.message",
        "http.client",
        "functools",
        "itertools",
        "textwrap",
        "zipfile",
        "csv",
    ):
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                docs.append(inspect.getdoc(obj) or "")
    text = "\n\n".join(d for d in docs if d)
    return np.asarray(Tokenizer.from_file(str(tokenizer_json)).encode(text).ids, dtype=np.int64)


def build_dataset(
    path: Path, positions: int, min_len: int, max_len: int, vocab: int, tokens: np.ndarray | None, seed: int = 0
) -> int:
    """Unpadded sequences of min_len..max_len tokens (uniform), ~``positions`` tokens in all; returns the count.

    Tokens are consecutive slices of ``tokens`` (real text) when given, else uniform random ids.
    """
    rng = np.random.default_rng(seed)
    seqs, total, cursor = [], 0, 0
    while total < positions:
        n = int(rng.integers(min_len, max_len + 1))
        if tokens is None:
            seq = rng.integers(0, vocab, n)
        else:
            seq = np.take(tokens, np.arange(cursor, cursor + n), mode="wrap")
            cursor += n
        seqs.append(seq.tolist())
        total += n
    table = pa.table(
        {"id": pa.array(np.arange(len(seqs), dtype=np.int64)), "input_ids": pa.array(seqs, type=pa.list_(pa.int64()))}
    )
    pq.write_table(table, path, row_group_size=1024)
    return len(seqs)


# -- measurements -------------------------------------------------------------------------------------------
def pipeline_batches(teacher: Teacher, config: CacheTeacherConfig) -> list[tuple[dict, int]]:
    """The feeds the pipeline makes, in its order: shard by shard, ``ShardRunner._batches``; with real positions."""
    dataset = Dataset(config.data)
    runner = ShardRunner(teacher, dataset, config, TOKEN)
    shard = config.shard_size or cache_teacher._DEFAULT_SHARD[TOKEN]
    batches = []
    for start in range(0, dataset.num_rows, shard):
        table = dataset.read(start, start + shard, runner.columns)
        arrays = {c: column_to_array(table.column(c), c) for c in runner.columns[1:]}
        for _, feeds, mask in runner._batches(arrays, table.num_rows):
            batches.append((feeds, int(mask.sum())))
    return batches


def time_bare(teacher: Teacher, batches: list[tuple[dict, int]]) -> dict:
    """Seconds inside ``session.run`` for the full logits, over all batches (and the first call's alone)."""
    calls = []
    for feeds, _ in batches:
        t = time.perf_counter()
        teacher.session.run([teacher.info.logits_output], feeds)
        calls.append(time.perf_counter() - t)
    positions, seconds = sum(n for _, n in batches), sum(calls)
    return {
        "positions": positions,
        "seconds": seconds,
        "positions_per_second": positions / seconds,
        "first_call_seconds": calls[0],
    }


def time_bare_fresh(path: Path, threads: int, batches: list[tuple[dict, int]]) -> dict:
    """``time_bare`` on a fresh ``Teacher`` session, released after: from its first call, as the pipeline's shard
    loop starts on its own fresh session. That call sizes ONNX Runtime's memory arena (its pages are touched
    for the first time); the same batch run once more after the loop tells what the warm-up cost."""
    teacher = Teacher(path, device="cpu", threads=threads)
    out = time_bare(teacher, batches)
    t = time.perf_counter()
    teacher.session.run([teacher.info.logits_output], batches[0][0])
    return out | {"warm_up_seconds": out["first_call_seconds"] - (time.perf_counter() - t)}


def time_bare_end_to_end(path: Path, threads: int, batches: list[tuple[dict, int]]) -> dict:
    """What a user's own script pays: a fresh ``onnxruntime.InferenceSession`` from the file (the pipeline's
    thread setting), ``session.run`` over all batches for the full logits, and the session's release (which the
    pipeline's wall time includes too); the wall time of all three."""
    import onnxruntime as ort

    t = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    for feeds, _ in batches:
        session.run([output], feeds)
    del session
    seconds = time.perf_counter() - t
    positions = sum(n for _, n in batches)
    return {"positions": positions, "seconds": seconds, "positions_per_second": positions / seconds}


def time_pipeline(config: CacheTeacherConfig) -> dict:
    """``cache_teacher.run`` end to end into ``config.cache_dir`` (fresh), then the cache is removed."""
    t = time.perf_counter()
    result = cache_teacher.run(config, progress=False, log=lambda message: None)
    wall = time.perf_counter() - t
    if result.hit:
        raise RuntimeError(f"{config.cache_dir} gave a cache hit; the benchmark needs a fresh cache directory")
    m = result.manifest
    columns = _column_bytes(result.path, m)
    shutil.rmtree(config.cache_dir)
    n = m["num_positions"]
    return {
        "positions": n,
        "wall_seconds": wall,
        "steady_seconds": m["run"]["seconds"],
        "positions_per_second": n / wall,
        "steady_positions_per_second": n / m["run"]["seconds"],
        "bytes_per_position": m["bytes_per_position"],
        "column_bytes_per_position": {c: b / n for c, b in columns.items()},
    }


def _column_bytes(path: Path, manifest: dict) -> dict[str, int]:
    """Compressed bytes per column over all shards (Parquet metadata)."""
    out: dict[str, int] = {}
    for shard in manifest["shards"]:
        meta = pq.ParquetFile(path / shard["file"]).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


# -- one variant per subprocess, for its peak RSS -----------------------------------------------------------
def _vm_hwm_mib() -> float:
    """This process's peak resident set (VmHWM). Not ``getrusage``: Linux carries ru_maxrss over fork and exec,
    so a child started by this (large) benchmark process would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status; the peak-RSS comparison needs Linux")


def _reset_vm_hwm() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that what follows is measured without what came before."""
    Path("/proc/self/clear_refs").write_text("5")


def child(spec_path: Path) -> None:
    """Run one variant once; write its timing and peak RSS to spec['result'].

    Two peaks: the whole process's, and the batch phase's (VmHWM restarted once the session exists and, for the
    pipeline, the shard runner starts): loading a large teacher can set the first, only the batches set the second.
    """
    spec = json.loads(spec_path.read_text())
    import_mib = _vm_hwm_mib()  # interpreter + imports (torch, ORT, pyarrow): the floor under every variant
    config = CacheTeacherConfig(**spec["config"])
    phase_peaks = []  # the process's peak before each VmHWM restart

    def restart() -> None:
        phase_peaks.append(_vm_hwm_mib())
        _reset_vm_hwm()

    if spec["variant"] == "bare":
        teacher = Teacher(config.teacher, device=config.device, threads=config.threads)
        batches = pipeline_batches(teacher, config)
        restart()
        out = time_bare(teacher, batches)
    else:
        start_shard = ShardRunner.__init__

        def init(self, *args, **kwargs) -> None:
            restart()
            start_shard(self, *args, **kwargs)

        ShardRunner.__init__ = init
        out = time_pipeline(config)
    batch_mib = _vm_hwm_mib()
    out |= {
        "peak_rss_mib": max([batch_mib, *phase_peaks]),
        "batch_peak_rss_mib": batch_mib,
        "import_rss_mib": import_mib,
    }
    Path(spec["result"]).write_text(json.dumps(out))


def run_child(variant: str, base: CacheTeacherConfig, workdir: Path) -> dict:
    """``host``/``graph`` set --postprocess; ``-noprobe`` sets probe_positions 0; ``bare`` is session.run alone."""
    postprocess, _, noprobe = variant.partition("-")
    config = dataclasses.replace(
        base,
        postprocess="host" if postprocess == "bare" else postprocess,
        probe_positions=0 if noprobe else base.probe_positions,
        cache_dir=str(workdir / f"cache-{variant}"),
    )
    spec, result = workdir / f"child-{variant}.json", workdir / f"child-{variant}.out.json"
    spec.write_text(json.dumps({"variant": postprocess, "config": dataclasses.asdict(config), "result": str(result)}))
    subprocess.run([sys.executable, __file__, "--child-spec", str(spec)], check=True)
    return json.loads(result.read_text())


# -- report -------------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise(rounds: list[dict], ks: list[int]) -> dict:
    bare = [r["bare"]["positions_per_second"] for r in rounds]
    bare_e2e = [r["bare_end_to_end"]["positions_per_second"] for r in rounds]
    out = {
        "bare_positions_per_second": {"median": _median(bare), "rounds": bare},
        "bare_warm_up_seconds": _median([r["bare"]["warm_up_seconds"] for r in rounds]),
        "bare_seconds": _median([r["bare"]["seconds"] for r in rounds]),
        "bare_end_to_end_positions_per_second": {"median": _median(bare_e2e), "rounds": bare_e2e},
        "k": {},
    }
    for k in ks:
        runs = [r["pipeline"][str(k)] for r in rounds]
        e2e = [p["positions_per_second"] for p in runs]
        steady = [p["steady_positions_per_second"] for p in runs]
        out["k"][str(k)] = {
            "pipeline_positions_per_second": {"median": _median(e2e), "rounds": e2e},
            "steady_positions_per_second": {"median": _median(steady), "rounds": steady},
            "ratio": _median(e2e) / _median(bare),
            "ratio_rounds": [p / b for p, b in zip(e2e, bare)],
            "end_to_end_ratio": _median(e2e) / _median(bare_e2e),
            "end_to_end_ratio_rounds": [p / b for p, b in zip(e2e, bare_e2e)],
            "steady_ratio": _median(steady) / _median(bare),
            "steady_ratio_rounds": [p / b for p, b in zip(steady, bare)],
            # The median of the rounds' own ratios: each pairs runs made seconds apart, so it is the less
            # affected by the machine's speed drifting between rounds.
            "paired": {
                "ratio": _median([p / b for p, b in zip(e2e, bare)]),
                "end_to_end_ratio": _median([p / b for p, b in zip(e2e, bare_e2e)]),
                "steady_ratio": _median([p / b for p, b in zip(steady, bare)]),
            },
            "startup_seconds": _median([p["wall_seconds"] - p["steady_seconds"] for p in runs]),
            "bytes_per_position": runs[-1]["bytes_per_position"],
            "logical_bytes_per_position": 8 * k + 8,  # k int32 ids + k float32 log-probs + logZ + tail mass
            "column_bytes_per_position": runs[-1]["column_bytes_per_position"],
        }
    return out


def print_report(result: dict) -> None:
    s = result["summary"]
    t = result["setup"]
    print(
        f"\nteacher: {t['teacher']} (V = {t['vocab']}, "
        f"{t['weight_mflops_per_position']:.1f} MFLOP/position in weight matmuls)"
    )
    print(
        f"data: {t['sequences']} sequences, {t['positions']} positions "
        f"({t['min_len']}..{t['max_len']} tokens, {t['tokens']} tokens), "
        f"batch {t['batch_size']}, threads {t['threads'] or 'auto'}, {t['rounds']} interleaved rounds"
    )
    for name, label in (
        ("bare_positions_per_second", "bare ORT session.run"),
        ("bare_end_to_end_positions_per_second", "bare ORT end to end (new session + runs)"),
    ):
        print(
            f"{'' if name.endswith('end_to_end_positions_per_second') else chr(10)}{label}: median "
            f"{s[name]['median']:.0f} positions/s (rounds: {', '.join(f'{v:.0f}' for v in s[name]['rounds'])})"
        )
    print(
        f"bare ORT's first call took {s['bare_warm_up_seconds']:.3f} s more than the same batch once warm "
        f"({s['bare_warm_up_seconds'] / s['bare_seconds']:.1%} of its loop; medians): the warm-up both loops pay"
    )
    print(
        "\nratio = pipeline end to end / bare session.run; e2e ratio = pipeline end to end / bare end to end; "
        "steady = the pipeline's shard loop / bare session.run"
    )
    print(
        f"\n{'k':>3} {'pipeline pos/s':>15} {'ratio':>6} {'per round':>17} {'e2e ratio':>10} {'per round':>17} "
        f"{'steady ratio':>13} {'per round':>17} {'startup s':>10} {'B/pos disk':>11} {'B/pos logical':>14}"
    )
    for k, r in s["k"].items():
        rounds, e2e, steady = (
            ", ".join(f"{v:.2f}" for v in r[name])
            for name in ("ratio_rounds", "end_to_end_ratio_rounds", "steady_ratio_rounds")
        )
        print(
            f"{k:>3} {r['pipeline_positions_per_second']['median']:>15.0f} {r['ratio']:>6.3f} {rounds:>17} "
            f"{r['end_to_end_ratio']:>10.3f} {e2e:>17} {r['steady_ratio']:>13.3f} {steady:>17} "
            f"{r['startup_seconds']:>10.2f} {r['bytes_per_position']:>11.1f} {r['logical_bytes_per_position']:>14d}"
        )
    for k, r in s["k"].items():
        paired = r["paired"]
        print(
            f"{k:>3} paired (median of the rounds' ratios): ratio {paired['ratio']:.3f}, "
            f"e2e ratio {paired['end_to_end_ratio']:.3f}, steady ratio {paired['steady_ratio']:.3f}"
        )
    last = list(s["k"].values())[-1]
    cols = ", ".join(f"{c} {b:.1f}" for c, b in last["column_bytes_per_position"].items())
    print(f"    on-disk bytes/position by column at k = {list(s['k'])[-1]}: {cols}")
    if result.get("placement"):
        runs = result["placement"]
        print(
            f"\ntop-k placement at k = {result['placement_k']}: one subprocess per run, "
            f"{len(next(iter(runs.values())))} interleaved round(s); "
            "medians; peak RSS of the process (VmHWM), and during the batches alone (VmHWM restarted after loading)"
        )
        print(
            f"{'variant':>14} {'pos/s':>8} {'vs bare':>8} {'per-round vs bare':>24} {'peak RSS MiB':>13} "
            f"{'batches MiB':>12} {'after imports MiB':>18}"
        )
        bare = [r["positions_per_second"] for r in runs.get("bare", [])]
        for name, rs in runs.items():
            rate = [r["positions_per_second"] for r in rs]
            ratio = f"{_median(rate) / _median(bare):.3f}" if bare else "-"
            per_round = ", ".join(f"{a / b:.3f}" for a, b in zip(rate, bare)) if bare else "-"
            print(
                f"{name:>14} {_median(rate):>8.0f} {ratio:>8} {per_round:>24} "
                f"{_median([r['peak_rss_mib'] for r in rs]):>13.0f} "
                f"{_median([r['batch_peak_rss_mib'] for r in rs]):>12.0f} "
                f"{_median([r['import_rss_mib'] for r in rs]):>18.0f}"
            )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--teacher",
        type=Path,
        help="token-level ONNX teacher (inputs input_ids, attention_mask); default: build the synthetic one",
    )
    p.add_argument("--vocab", type=int, default=50_257, help="synthetic teacher's vocabulary (GPT-2's size)")
    p.add_argument("--width", type=int, default=576, help="synthetic teacher's width d (SmolLM2-135M's)")
    p.add_argument("--layers", type=int, default=4, help="synthetic teacher's residual MatMul+Relu layers")
    p.add_argument(
        "--positions",
        type=int,
        default=24_000,
        help="token positions in the dataset (sized for an idle 2-core machine: "
        "~20 s per bare measurement of the synthetic teacher; use fewer on a loaded one)",
    )
    p.add_argument("--min-len", type=int, default=32, help="shortest sequence, tokens")
    p.add_argument("--max-len", type=int, default=128, help="longest sequence, tokens")
    p.add_argument(
        "--tokens",
        choices=("auto", "random", "text"),
        default="auto",
        help="sequence contents: random ids, or stdlib docstrings through the tokenizer.json next to --teacher "
        "(auto: text when there is one)",
    )
    p.add_argument("--top-k", type=int, nargs="+", default=list(KS), help="k values measured in every round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (bare, then the pipeline at each k)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=CacheTeacherConfig.batch_size,
        help="sequences per teacher call (the pipeline's default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads; 0 = one per core (the pipeline's default)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="T of the cached softmax")
    p.add_argument(
        "--placement",
        nargs="*",
        choices=PLACEMENTS,
        default=list(PLACEMENTS),
        help="top-k placement variants, one subprocess each (give the flag alone to skip them)",
    )
    p.add_argument("--placement-k", type=int, default=32, help="k for the top-k placement comparison")
    p.add_argument("--placement-rounds", type=int, default=1, help="interleaved rounds of the placement subprocesses")
    p.add_argument(
        "--workdir", type=Path, help="where the teacher, dataset and caches go (default: a temp dir, removed after)"
    )
    p.add_argument("--json", type=Path, help="also write every number as JSON here")
    p.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_spec:
        child(args.child_spec)
        return
    if not 1 <= args.min_len <= args.max_len:
        p.error(f"--min-len {args.min_len} and --max-len {args.max_len} need 1 <= min <= max")
    if args.rounds < 1 or args.placement_rounds < 1:
        p.error(f"--rounds {args.rounds} and --placement-rounds {args.placement_rounds} must be >= 1")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = benchmark(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    if args.teacher is None:
        teacher_path = workdir / "synthetic_lm.onnx"
        build_synthetic_teacher(teacher_path, args.vocab, args.width, args.layers)
    else:
        teacher_path = args.teacher
    tokenizer = teacher_path.parent / "tokenizer.json"
    use_text = args.tokens == "text" or (args.tokens == "auto" and args.teacher is not None and tokenizer.is_file())
    data_path = workdir / "tokens.parquet"
    bare_teacher = Teacher(teacher_path, device="cpu", threads=args.threads)
    vocab = bare_teacher.info.num_classes or args.vocab
    sequences = build_dataset(
        data_path, args.positions, args.min_len, args.max_len, vocab, text_tokens(tokenizer) if use_text else None
    )

    def config(k: int, postprocess: str, cache_dir: Path) -> CacheTeacherConfig:
        return CacheTeacherConfig(
            teacher=str(teacher_path),
            data=str(data_path),
            top_k=k,
            temperature=args.temperature,
            cache_dir=str(cache_dir),
            batch_size=args.batch_size,
            device="cpu",
            threads=args.threads,
            postprocess=postprocess,
        )

    batches = pipeline_batches(bare_teacher, config(args.top_k[0], "host", workdir))
    padded = sum(f["input_ids"].size for f, _ in batches)
    positions = sum(n for _, n in batches)
    setup = {
        "teacher": str(args.teacher or f"synthetic (d={args.width}, {args.layers} layers)"),
        "vocab": vocab,
        "weight_mflops_per_position": weight_flops_per_position(teacher_path) / 1e6,
        "sequences": sequences,
        "positions": positions,
        "padding_fraction": 1 - positions / padded,
        "batches": len(batches),
        "min_len": args.min_len,
        "max_len": args.max_len,
        "tokens": "text" if use_text else "random",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"{setup['teacher']}: {positions} positions in {len(batches)} batches "
        f"({setup['padding_fraction']:.1%} padding)",
        flush=True,
    )
    # No session stays alive across the pipeline's runs: holding a second 1.2 GB session made the pipeline's own
    # session creation 2-3x slower at V = 262,144 (measured), which a real run never pays.
    del bare_teacher

    rounds = []
    for r in range(args.rounds):
        # ABBA: every other round runs the pipeline first, so a machine slowing down (or speeding up) across a
        # round does not favour one side.
        pipeline_first = r % 2 == 1
        entry = {"pipeline": {}, "pipeline_first": pipeline_first}
        for side in ("pipeline", "bare") if pipeline_first else ("bare", "pipeline"):
            if side == "bare":
                entry["bare"] = time_bare_fresh(teacher_path, args.threads, batches)
                entry["bare_end_to_end"] = time_bare_end_to_end(teacher_path, args.threads, batches)
            else:
                for k in args.top_k:
                    entry["pipeline"][str(k)] = time_pipeline(config(k, "host", workdir / f"cache-r{r}-k{k}"))
        print(
            f"round {r + 1}{' (pipeline first)' if pipeline_first else ''}: "
            f"bare {entry['bare']['positions_per_second']:.0f} pos/s "
            f"(end to end {entry['bare_end_to_end']['positions_per_second']:.0f})",
            end="",
            flush=True,
        )
        for k in args.top_k:
            run = entry["pipeline"][str(k)]
            if run["positions"] != positions:
                raise RuntimeError(
                    f"the pipeline cached {run['positions']} positions, the bare batches hold {positions}"
                )
            print(
                f" | k={k} {run['positions_per_second']:.0f} pos/s "
                f"({run['positions_per_second'] / entry['bare']['positions_per_second']:.3f})",
                end="",
                flush=True,
            )
        print(flush=True)
        rounds.append(entry)
    del batches

    placement: dict[str, list[dict]] = {v: [] for v in args.placement}
    for r in range(args.placement_rounds if args.placement else 0):
        print(f"placement round {r + 1}:", end="", flush=True)
        for variant in args.placement:
            placement[variant].append(run_child(variant, config(args.placement_k, "host", workdir), workdir))
            print(
                f" | {variant} {placement[variant][-1]['positions_per_second']:.0f} pos/s, "
                f"{placement[variant][-1]['peak_rss_mib']:.0f} MiB",
                end="",
                flush=True,
            )
        print(flush=True)
    return {
        "setup": setup,
        "rounds": rounds,
        "summary": summarise(rounds, args.top_k),
        "placement": placement,
        "placement_k": args.placement_k,
    }


if __name__ == "__main__":
    main()
