"""Turn text (plain files, JSONL, chat conversations, CSV, Parquet, a ``datasets`` folder) into a token dataset.

``run(config)`` reads every source into documents, tokenises them with the teacher's tokenizer and writes the
documented dataset format (README, "Dataset format"): ``id``, ``input_ids`` (unpadded), ``label`` when a label
field is given, and ``loss_mask`` for chat data (1 on the assistant's tokens: stage two trains and scores only
those). ``--pack`` joins documents with the end-of-text token and cuts fixed-length sequences; otherwise each
document is one row, truncated to ``max_length`` with a count of what was cut. ``--split`` divides documents
(never a document's tokens) with a seed, one file per split. The tokenizer's sha256 goes into the Parquet
metadata, where cache-teacher and train-student read it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.dataset import ID_COLUMN, LABEL_COLUMNS, LOSS_MASK_COLUMN, TOKENIZER_SHA256_KEY, Dataset
from stages.errors import ConfigError, DatasetError
from stages.export_teacher import read_card
from stages.hf_source import load_tokenizer, tokenizer_sha256

_TEXT_SUFFIXES = (".txt", ".md", ".text")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
METADATA_KEY = b"kd.prepare"  # JSON: tokenizer, sources, counts, label names


@dataclass
class PrepareDataConfig:
    src: list[str] = field(default_factory=list)  # text / JSONL / CSV / Parquet files or datasets folders (required)
    tokenizer: str = ""  # the teacher's tokenizer: a folder (export-teacher's out) or a tokenizer.json (required)
    out: str = ""  # DATA.parquet; with split, the folder DATA/ gets one <name>.parquet per split (required)
    max_length: int = 512  # tokens per row: the packed length, or where a document is truncated
    pack: bool = False  # join documents with the end-of-text token and cut max_length sequences (LM pretraining)
    text_field: str = "text"  # JSONL/CSV/Parquet column holding the text
    label_field: str = ""  # column holding a class label (name or integer); empty = no labels
    chat: bool = False  # records hold `messages` rendered with the tokenizer's chat template; loss on assistant only
    split: str = ""  # e.g. train=0.9,val=0.05,test=0.05 (by document); empty = one file
    seed: int = 0  # the split's shuffle

    def problems(self) -> list[str]:
        out = []
        if not self.src:
            out.append("src: required (one or more text, JSONL, CSV or Parquet files, or datasets folders)")
        if not self.tokenizer:
            out.append("tokenizer: required (the teacher's export folder or a tokenizer.json)")
        if not self.out:
            out.append("out: required (the Parquet file to write)")
        if self.max_length < 2:
            out.append(f"max_length: {self.max_length} must be >= 2 (a next-token target needs two tokens)")
        if self.pack and self.label_field:
            out.append("pack: packing joins documents, so per-document labels cannot be kept; drop --pack or the label")
        if self.chat and self.label_field:
            out.append("chat: chat data trains a language model; a label field does not apply")
        if self.split:
            try:
                parse_split(self.split)
            except ConfigError as exc:
                out.append(str(exc))
        return out


@dataclass
class PrepareResult:
    path: Path  # the Parquet file, or the folder of splits
    counts: dict  # rows, tokens, truncated documents / tokens, per split


def run(config: PrepareDataConfig, log=print) -> PrepareResult:
    tokenizer = load_tokenizer(config.tokenizer)
    if config.chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"--chat needs a chat template, but the tokenizer {config.tokenizer} has none; use the instruct "
            "model's tokenizer (its tokenizer_config.json or chat_template.jinja holds the template)"
        )
    records = [r for src in config.src for r in read_records(src, config)]
    if not records:
        raise DatasetError(f"no documents found in {config.src}")
    labels, label_names = _labels(records, config)
    encoded = [_encode(tokenizer, r, config) for r in records]
    splits = {"": np.arange(len(encoded))}
    if config.split:
        splits = _split_indices(len(encoded), parse_split(config.split), config.seed)
    out = Path(config.out)
    target = out.with_suffix("") if config.split else out
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "tokenizer": str(Path(config.tokenizer).resolve()),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "sources": [str(Path(s).resolve()) for s in config.src],
        "label_names": label_names,
        "config": {k: v for k, v in vars(config).items() if k != "src"},
    }
    counts = {}
    for name, idx in splits.items():
        docs = [encoded[i] for i in idx]
        doc_labels = [labels[i] for i in idx] if labels is not None else None
        table, stats = _rows(docs, doc_labels, tokenizer, config)
        path = target / f"{name}.parquet" if name else target
        path.parent.mkdir(parents=True, exist_ok=True)
        file_meta = {TOKENIZER_SHA256_KEY: meta["tokenizer_sha256"], METADATA_KEY: json.dumps(meta | {"split": name})}
        pq.write_table(table.replace_schema_metadata(file_meta), path)
        counts[name or "all"] = stats
        cut = f", {stats['truncated_documents']} documents truncated ({stats['truncated_tokens']} tokens cut)"
        log(f"{path}: {stats['rows']} rows, {stats['tokens']} tokens" + (cut if stats["truncated_documents"] else ""))
    return PrepareResult(target, counts)


def parse_split(text: str) -> dict[str, float]:
    """``train=0.9,val=0.1`` -> {"train": 0.9, "val": 0.1}; fractions > 0 that sum to 1."""
    parts: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not eq or not name.strip().isidentifier() or not fraction > 0 or name.strip() in parts:
            raise ConfigError(f"split: {item!r} is not NAME=FRACTION with a new name and fraction > 0")
        parts[name.strip()] = fraction
    if len(parts) < 2 or abs(sum(parts.values()) - 1) > 1e-6:
        raise ConfigError(f"split: {text!r} needs two or more parts whose fractions sum to 1")
    return parts


def prepared_tokenizer(dataset: Dataset) -> str | None:
    """The tokenizer path prepare-data recorded in a dataset's metadata, or None for data made another way."""
    raw = (dataset.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw)["tokenizer"] if raw else None


# ---- reading ----------------------------------------------------------------------------------------------------


def read_records(src: str, config: PrepareDataConfig) -> list[dict]:
    """One dict per document from one source, each with ``text`` or ``messages`` and maybe ``label``."""
    path = Path(src)
    if not path.exists():
        raise DatasetError(f"source {src} does not exist")
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif path.suffix in _TEXT_SUFFIXES:
        # Blank lines separate documents: paragraphs of prose, or one document per line-delimited block.
        return [{"text": p.strip()} for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    elif path.suffix in _JSONL_SUFFIXES:
        rows = _read_jsonl(path)
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        raise DatasetError(
            f"source {src}: unknown kind {path.suffix!r}; use .txt/.md, .jsonl, .csv, .parquet or a datasets folder"
        )
    return [_record(row, i, src, config) for i, row in enumerate(rows)]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {n} is not JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{path} line {n} is a {type(row).__name__}, not a JSON object")
        rows.append(row)
    return rows


def _read_datasets_folder(path: Path) -> list[dict]:
    """A ``Dataset.save_to_disk`` folder, read by the datasets library itself (its layout is its own business)."""
    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DatasetError(f"{path} is a folder but not a datasets save_to_disk folder (no state.json)")
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            f"reading the datasets folder {path} needs the datasets package: pip install datasets"
        ) from exc
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise DatasetError(
            f"{path} holds the splits {sorted(loaded)}; pass one split's folder, e.g. {path / next(iter(loaded))}"
        )
    return loaded.to_list()


def _record(row: dict, index: int, src: str, config: PrepareDataConfig) -> dict:
    where = f"{src} record {index + 1}"
    if config.chat:
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DatasetError(f"{where}: --chat needs a 'messages' list of {{role, content}}; it has {sorted(row)}")
        record = {"messages": messages}
    else:
        text = row.get(config.text_field)
        if not isinstance(text, str):
            hint = "; it holds 'messages': pass --chat" if "messages" in row else ""
            raise DatasetError(
                f"{where} has no text field {config.text_field!r} (fields: {sorted(row)}){hint}; "
                "name the text column with --text-field"
            )
        record = {"text": text}
    if config.label_field:
        if row.get(config.label_field) in (None, ""):
            raise DatasetError(f"{where} has no label field {config.label_field!r} (fields: {sorted(row)})")
        record["label"] = row[config.label_field]
    return record


# ---- labels, tokens, rows ---------------------------------------------------------------------------------------


def _labels(records: list[dict], config: PrepareDataConfig) -> tuple[list[int] | None, list[str] | None]:
    """Integer labels and their names. The teacher's own label names win (its card or config.json), so the
    dataset's class ids are the teacher's; without them, names are numbered in sorted order."""
    if not config.label_field:
        return None, None
    names = _teacher_labels(Path(config.tokenizer))
    values = [r["label"] for r in records]
    if names is None:
        if all(_is_int(v) for v in values):
            return [int(v) for v in values], None
        names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    out = []
    for n, v in enumerate(values):
        if str(v) in index:
            out.append(index[str(v)])
        elif _is_int(v) and 0 <= int(v) < len(names):
            out.append(int(v))
        else:
            raise DatasetError(
                f"record {n + 1}: label {v!r} is not one of the teacher's {len(names)} labels {names}; fix the data "
                "or map it to one of them"
            )
    return out, names


def _teacher_labels(folder: Path) -> list[str] | None:
    if not folder.is_dir():
        return None
    card = read_card(folder)
    if card is not None:
        return card.get("labels")
    config = folder / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        if any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
            id2label = cfg.get("id2label") or {}
            return [str(id2label[str(i)]) for i in range(len(id2label))]
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())


def _encode(tokenizer, record: dict, config: PrepareDataConfig) -> tuple[list[int], list[int] | None]:
    """(token ids, per-token loss mask or None). Chat: the mask is 1 on tokens inside an assistant message."""
    if "text" in record:
        return tokenizer(record["text"], add_special_tokens=True)["input_ids"], None
    messages = record["messages"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The assistant's text is what the template adds after the generation prompt of the messages before it.
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        stop = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, stop))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= lo < b for a, b in spans)) for lo, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def _split_indices(n: int, parts: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    edges = np.round(np.cumsum([0.0, *parts.values()]) * n).astype(int)
    return {name: np.sort(order[a:b]) for name, a, b in zip(parts, edges[:-1], edges[1:])}


def _rows(docs: list, labels: list[int] | None, tokenizer, config: PrepareDataConfig) -> tuple[pa.Table, dict]:
    chat = config.chat
    stats = {"documents": len(docs), "truncated_documents": 0, "truncated_tokens": 0}
    if config.pack:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"--pack joins documents with the end-of-text token, but {config.tokenizer} has none")
        ids = [t for d, _ in docs for t in [*d, tokenizer.eos_token_id]]
        masks = [m for d, mk in docs for m in [*(mk or []), 0]] if chat else None
        cuts = range(0, len(ids), config.max_length)
        rows = [ids[c : c + config.max_length] for c in cuts]
        row_masks = [masks[c : c + config.max_length] for c in cuts] if chat else None
        row_labels = None
    else:
        rows, row_masks, row_labels = [], [] if chat else None, [] if labels is not None else None
        for j, (d, mk) in enumerate(docs):
            if not d:
                continue  # an empty document has no token to predict
            if len(d) > config.max_length:
                stats["truncated_documents"] += 1
                stats["truncated_tokens"] += len(d) - config.max_length
            rows.append(d[: config.max_length])
            if chat:
                row_masks.append(mk[: config.max_length])
            if labels is not None:
                row_labels.append(labels[j])
    columns = {
        ID_COLUMN: pa.array(np.arange(len(rows), dtype=np.int64)),
        "input_ids": pa.array(rows, type=pa.list_(pa.int32())),
    }
    if row_masks is not None:
        columns[LOSS_MASK_COLUMN] = pa.array(row_masks, type=pa.list_(pa.int8()))
    if row_labels is not None:
        columns[LABEL_COLUMNS[0]] = pa.array(row_labels, type=pa.int64())
    stats |= {"rows": len(rows), "tokens": sum(len(r) for r in rows)}
    return pa.table(columns), stats
