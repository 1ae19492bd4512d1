"""Bytes per position against KD-loss error for each top-k encoding, on a real teacher's cached top-k.

Method: take the first ``--positions`` positions of an fp32 top-k cache (k >= the largest k measured) and the
student's logits on the same tokens (an ONNX student run over the cache's dataset). For each k, the top-k
prefix of the exact log-probabilities is itself an exact top-k cache (log-probs are normalised over the full
vocabulary; the tail is recomputed as 1 - sum p). Each encoding then writes those positions as one shard with
the cache's own writer (``stages.cache_format.write_shard``: zstd, the same options), which gives bytes per
position; its decoded log-probs feed the training loss (``stages.losses.KDLoss``, alpha = 1, T = the cache's)
against the same student logits, and the relative error is |loss(decoded) - loss(fp32)| / loss(fp32). *argmax not
first*: positions whose decoded first id is not the teacher's top-1.

Top-p rows (``--top-p``): with the largest k as the maximum and min_k = 1, each position keeps the smallest prefix
of its exact top-k whose probability reaches P (``stages.targets.top_p_lengths``), the tail recomputed over the
kept ids; each encoding writes them as ragged lists with the top-p format's own writer and reader
(``shard_columns``, ``decode``), and the error is against the fp32 cache at that largest k.

    python benchmarks/encodings.py --cache /tmp/smol/cache/bbb79691f35d96b5 --student /tmp/smol/run/student.onnx
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import torch

from stages import targets as target_math
from stages.cache_format import open_cache, write_shard
from stages.dataset import Dataset
from stages.formats import ENCODINGS, TOP_P_ENCODINGS, by_id, fixed_list
from stages.losses import KDLoss, SoftTargets


def load_positions(cache_ref: str, positions: int) -> tuple[dict[str, np.ndarray], list[int], Dataset]:
    """The first ``positions`` cached positions (whole examples) and each example's length."""
    cache = open_cache(cache_ref)
    tables, rows = [], 0
    for table in cache.iter_tables(["id", "position", "topk_ids", "topk_logp", "logz"]):
        tables.append(table)
        rows += table.num_rows
        if rows >= positions:
            break
    table = pa.concat_tables(tables)
    ids = table.column("id").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    lengths = np.diff(np.concatenate([starts, [len(ids)]]))
    keep = int(np.searchsorted(np.cumsum(lengths), positions, side="right")) or 1  # whole examples only
    n = int(lengths[:keep].sum())
    k = cache.top_k
    out = {
        "id": ids[:n],
        "position": table.column("position").to_numpy()[:n],
        "ids": np.array(table.column("topk_ids").combine_chunks().flatten()).reshape(-1, k)[:n],
        "logp": np.array(table.column("topk_logp").combine_chunks().flatten()).reshape(-1, k)[:n],
        "logz": table.column("logz").to_numpy()[:n],
        "temperature": cache.temperature,
        "num_classes": cache.num_classes,
        "top_k": k,
    }
    return out, lengths[:keep].tolist(), Dataset(cache.manifest["dataset"]["path"])


def student_logits(student: str, data: Dataset, example_ids: np.ndarray, lengths: list[int]) -> torch.Tensor:
    """[positions, V] float32 student logits on the cached positions, one example per call."""
    session = ort.InferenceSession(student, providers=["CPUExecutionProvider"])
    table = data.read(0, data.num_rows, ["id", "input_ids"])
    row_of = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    outs = []
    for example, length in zip(dict.fromkeys(example_ids.tolist()), lengths):
        tokens = np.asarray(table.column("input_ids")[row_of[example]].as_py(), dtype=np.int64)[None, :length]
        feeds = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
        outs.append(session.run(None, feeds)[0][0])
    return torch.from_numpy(np.concatenate(outs).astype(np.float32))


def measure(base: dict, logits: torch.Tensor, ks: list[int], workdir: Path) -> list[dict]:
    n, results = len(base["id"]), []
    mask, labels = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    loss = KDLoss(1.0, base["temperature"])
    for k in ks:
        ids, exact = base["ids"][:, :k], base["logp"][:, :k]
        tail = np.maximum(1 - np.exp(exact.astype(np.float64)).sum(1), 0).astype(np.float32)
        reference = None
        for name, encoding in ENCODINGS.items():
            packed = encoding.pack(ids.astype(np.int32), exact)
            columns = {
                "id": pa.array(base["id"]),
                "position": pa.array(base["position"]),
                **{c: fixed_list(a, k) if a.ndim == 2 else pa.array(a) for c, a in packed.items()},
                "logz": pa.array(base["logz"]),
                "tail_mass": pa.array(tail),
            }
            entry = write_shard(pa.table(columns), workdir / f"k{k}-{name}.parquet", encoding.parquet_options)
            decoded_ids, decoded = encoding.unpack(packed, tail)
            targets = SoftTargets(
                torch.from_numpy(decoded_ids.astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(decoded)),
                torch.from_numpy(base["logz"].copy()),
                base["temperature"],
                base["num_classes"],
            )
            value = float(loss(logits, targets, labels, mask).total)
            reference = value if name == "fp32" else reference
            aligned = by_id(ids, exact)
            p = np.exp(aligned)
            results.append(
                {
                    "k": k,
                    "top_p": 1.0,
                    "mean_kept": float(k),
                    "encoding": name,
                    "bytes_per_position": entry["bytes"] / n,
                    "kd_loss": value,
                    "relative_kd_error": abs(value - reference) / reference,
                    "encoding_kl_mean": float((p * (aligned - by_id(decoded_ids, decoded))).sum(1).mean()),
                    "max_abs_dlogp": float(np.abs(by_id(decoded_ids, decoded) - aligned).max()),
                    "argmax_displaced": int((decoded_ids[:, 0] != ids[:, 0]).sum()),
                }
            )
    return results


def measure_top_p(base: dict, logits: torch.Tensor, k: int, ps: list[float], reference: float, workdir: Path):
    """Top-p rows: each P's ragged lists in every encoding, written and read back by the top-p format itself;
    ``reference`` is the fp32 top-k cache's loss at this k."""
    n, results = len(base["id"]), []
    mask, labels = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    loss = KDLoss(1.0, base["temperature"])
    logp_k = torch.from_numpy(np.ascontiguousarray(base["logp"][:, :k]))
    for p in ps:
        kept = target_math.top_p_lengths(logp_k, p, 1)
        valid = torch.arange(k) < kept[:, None]
        exact = logp_k.masked_fill(~valid, -np.inf)
        ids = torch.from_numpy(base["ids"][:, :k].astype(np.int32)).masked_fill(~valid, 0)
        tail = target_math.tail_mass(exact, base["num_classes"], valid)
        out = {"ids": ids.numpy(), "logp": exact.numpy(), "logz": base["logz"], "tail": tail.numpy()}
        out["kept"] = kept.numpy()
        manifest = {"top_k": k, "min_k": 1}
        for name, encoding in TOP_P_ENCODINGS.items():
            columns = encoding.shard_columns(out, SimpleNamespace(top_k=k))
            table = pa.table({"id": pa.array(base["id"]), "position": pa.array(base["position"]), **columns})
            entry = write_shard(table, workdir / f"p{p}-{name}.parquet", encoding.parquet_options)
            decoded = encoding.decode(table, manifest, 0)
            soft = SoftTargets(
                torch.from_numpy(decoded["ids"]),
                torch.from_numpy(decoded["logp"]),
                torch.from_numpy(base["logz"].copy()),
                base["temperature"],
                base["num_classes"],
                torch.from_numpy(decoded["valid"]),
            )
            value = float(loss(logits, soft, labels, mask).total)
            aligned, got = by_id(out["ids"], out["logp"]), by_id(decoded["ids"], decoded["logp"])
            p_exact = np.exp(aligned)
            with np.errstate(invalid="ignore"):  # -inf - -inf at the padding, which has probability 0
                diff = np.where(p_exact > 0, aligned - got, 0.0)
            results.append(
                {
                    "k": k,
                    "top_p": p,
                    "mean_kept": float(kept.double().mean()),
                    "encoding": name,
                    "bytes_per_position": entry["bytes"] / n,
                    "kd_loss": value,
                    "relative_kd_error": abs(value - reference) / reference,
                    "encoding_kl_mean": float((p_exact * diff).sum(1).mean()),
                    "max_abs_dlogp": float(np.abs(diff).max()),
                    "argmax_displaced": int((decoded["ids"][:, 0] != out["ids"][:, 0]).sum()),
                }
            )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="an fp32 top-k cache of a token-level teacher (path or key)")
    p.add_argument("--student", required=True, help="ONNX student (input_ids, attention_mask -> logits)")
    p.add_argument("--positions", type=int, default=2000, help="cached positions measured (whole examples)")
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 32, 64], help="k values (<= the cache's k)")
    p.add_argument(
        "--top-p", type=float, nargs="*", default=[0.9, 0.95, 0.99], help="top-p rows, at most the largest k ids"
    )
    p.add_argument("--json", type=Path, help="also write every number as JSON here")
    args = p.parse_args()
    base, lengths, data = load_positions(args.cache, args.positions)
    if max(args.top_k) > base["top_k"]:
        raise SystemExit(f"--top-k {max(args.top_k)} is more than the cache holds ({base['top_k']})")
    logits = student_logits(args.student, data, base["id"], lengths)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(base, logits, args.top_k, Path(tmp))
        k = max(args.top_k)
        reference = next(r["kd_loss"] for r in results if r["k"] == k and r["encoding"] == "fp32")
        results += measure_top_p(base, logits, k, args.top_p, reference, Path(tmp))
    print(f"{len(base['id'])} positions of cache {args.cache}, V = {base['num_classes']}, T = {base['temperature']:g}")
    print(
        "| k | top-p | mean ids kept | encoding | bytes/position | KD loss | relative KD-loss error "
        "(vs fp32 top-k) | mean KL(exact‖decoded) | max abs Δlog p | argmax not first |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        top_p = "-" if r["top_p"] == 1.0 else f"{r['top_p']:g}"
        print(
            f"| {r['k']} | {top_p} | {r['mean_kept']:.1f} | {r['encoding']} | {r['bytes_per_position']:.1f} | "
            f"{r['kd_loss']:.5f} | {r['relative_kd_error']:.2e} | {r['encoding_kl_mean']:.2e} | "
            f"{r['max_abs_dlogp']:.2e} | {r['argmax_displaced']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"positions": len(base["id"]), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
