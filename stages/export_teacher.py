"""Export a local Hugging Face model (folder or GGUF file) to an ONNX teacher that cache-teacher can run.

``run(config)`` loads the model in fp32 without a KV cache, exports it with torch's dynamo exporter (dynamic
``batch`` and ``seq`` axes), copies the tokenizer (chat template included) next to it, runs the file in ONNX
Runtime against torch on a probe batch, and writes a card (``teacher.json``) with the task, vocabulary,
tokenizer sha256, source, opset and the measured max |onnx - torch| logit. The card is written last: a folder
without it did not pass the check.

Why not optimum: ``optimum-onnx`` (the Hub's standard exporter) pins ``transformers<4.58`` and would downgrade
the transformers 5 this project uses, so the export is done with ``torch.onnx.export(dynamo=True)`` directly.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from stages.cache_write import write_json_atomic
from stages.errors import ConfigError, TeacherError
from stages.hf_source import check_local, has_weights, is_gguf, load_tokenizer, require_transformers, tokenizer_sha256

TASKS = ("causal-lm", "sequence-classification", "feature-extraction")
DTYPES = ("fp32", "fp16")
ONNX_NAME = "teacher.onnx"  # the export folder's files: this module owns their names
CARD_NAME = "teacher.json"
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello!",
    "Knowledge distillation trains a small student on the soft targets of a larger teacher.",
]
# Largest allowed max |onnx - torch| over real positions, as a fraction of the largest |logit|: fp32 exports agree
# to ~1e-6 relative; fp16 weights round to ~1e-3 relative, summed over layers.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
_EXTERNAL_FROM = 2**31 - 2**24  # protobuf cannot serialise 2 GB: larger weights go to an external data file


@dataclass
class ExportTeacherConfig:
    src: str = ""  # local HF model folder or .gguf file (required)
    task: str = "causal-lm"  # what the exported graph returns: next-token logits, class logits, or hidden states
    out: str = ""  # export folder (required); created if missing
    opset: int = 0  # ONNX opset; 0 = the exporter's default
    dtype: str = "fp32"  # fp16 halves the file; ORT CPU runs fp32 fastest
    optimize: bool = True  # onnxscript's graph clean-up (constant folding, dead nodes); off halves the export time

    def problems(self) -> list[str]:
        out = []
        if not self.src:
            out.append("src: required (a local Hugging Face model folder or a .gguf file)")
        if not self.out:
            out.append("out: required (the export folder)")
        if self.task not in TASKS:
            out.append(f"task: {self.task!r} must be one of {TASKS}")
        if self.dtype not in DTYPES:
            out.append(f"dtype: {self.dtype!r} must be one of {DTYPES}")
        if self.opset and not 14 <= self.opset <= 23:
            out.append(f"opset: {self.opset} must be in [14, 23] (0 for the exporter's default)")
        return out


@dataclass
class ExportResult:
    onnx_path: Path
    card: dict


class _Graph(nn.Module):
    """forward(input_ids, attention_mask[, token_type_ids]) -> the task's one output tensor; no past, no dicts."""

    def __init__(self, model: nn.Module, task: str, input_names: list[str]):
        super().__init__()
        self.model = model
        self.task = task
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, tensors))
        if self.task == "feature-extraction":
            return self.model(**kwargs).last_hidden_state
        if self.task == "causal-lm":
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def run(config: ExportTeacherConfig, log=print) -> ExportResult:
    transformers = require_transformers()
    src = check_local(config.src, "model")
    tokenizer = _tokenizer(src)
    model = _load_model(transformers, src, config.task)
    if config.dtype == "fp16":
        model = model.half()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD_NAME).unlink(missing_ok=True)  # the card marks a checked export; an old one must not outlive it
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    graph = _Graph(model, config.task, input_names).eval()
    started = time.perf_counter()
    external = _export(graph, tokenizer, input_names, out / ONNX_NAME, config.opset, config.optimize)
    seconds = time.perf_counter() - started
    log(f"exported {src} ({config.task}) in {seconds:.0f} s; checking against torch")
    tokenizer.save_pretrained(out)
    max_diff, scale = check(out / ONNX_NAME, graph, tokenizer, input_names, TOLERANCE[config.dtype])
    opset = next(
        o.version for o in onnx.load(str(out / ONNX_NAME), load_external_data=False).opset_import if not o.domain
    )
    card = {
        "task": config.task,
        "source": str(src.resolve()),
        "source_format": "gguf" if is_gguf(src) else "folder",
        "model_type": model.config.model_type,
        "vocab_size": int(model.config.vocab_size),
        "num_labels": int(model.config.num_labels) if config.task == "sequence-classification" else None,
        "labels": _labels(model) if config.task == "sequence-classification" else None,
        "inputs": input_names,
        "output": "last_hidden_state" if config.task == "feature-extraction" else "logits",
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "opset": opset,
        "dtype": config.dtype,
        "external_data": external,
        "export_seconds": round(seconds, 1),
        "check": {"max_abs_diff": max_diff, "logit_scale": scale, "tolerance": TOLERANCE[config.dtype]},
        "hidden_tensors": hidden_tensors(out / ONNX_NAME, model),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
    }
    write_json_atomic(card, out / CARD_NAME)
    return ExportResult(out / ONNX_NAME, card)


def read_card(folder: str | Path) -> dict | None:
    """The export card of an ONNX teacher's folder, or None for a teacher not made by export-teacher."""
    path = Path(folder) / CARD_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _tokenizer(src: Path):
    """The source's tokenizer, padding on the right with a real pad id (eos when the model defines none)."""
    try:
        tokenizer = load_tokenizer(src)
    except ConfigError as exc:
        raise ConfigError(f"model {src}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {src} has neither a pad nor an eos token; set pad_token in its config")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked and never cached
    tokenizer.padding_side = "right"
    return tokenizer


def _load_model(transformers, src: Path, task: str) -> nn.Module:
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]
    if is_gguf(src):
        kwargs = {"gguf_file": src.name}
        folder = src.parent
    else:
        if not src.is_dir() or not (src / "config.json").is_file():
            raise ConfigError(f"{src} is not a Hugging Face model folder (no config.json) nor a .gguf file")
        if not has_weights(src):
            raise ConfigError(f"model folder {src} has a config but no weights (*.safetensors or *.bin)")
        kwargs, folder = {}, src
    try:
        model = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load {src} as a {task} model: {exc}") from exc
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the graph returns logits only; no past key/values
    return model.eval()


def _labels(model: nn.Module) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(model.config.num_labels)]


def _export(graph: _Graph, tokenizer, input_names: list[str], path: Path, opset: int, optimize: bool) -> bool:
    """Dynamo export with dynamic batch and seq axes; returns True when the weights went to external data."""
    batch = tokenizer(PROBE_TEXTS[:2], padding=True, return_tensors="pt")  # batch 2: a batch of 1 fixes the axis
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    kwargs = {"opset_version": opset} if opset else {}
    try:
        with _quiet():
            program = torch.onnx.export(
                graph,
                tuple(batch[n] for n in input_names),
                input_names=input_names,
                output_names=["last_hidden_state" if graph.task == "feature-extraction" else "logits"],
                dynamic_shapes=(tuple(dims for _ in input_names),),  # one entry: the *tensors varargs
                dynamo=True,
                optimize=optimize,
                **kwargs,
            )
    except Exception as exc:  # the exporter's failures are many and unstable across versions
        raise TeacherError(f"torch.onnx.export failed for this model: {type(exc).__name__}: {exc}") from exc
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = weights >= _EXTERNAL_FROM
    for old in path.parent.glob(path.name + "*"):  # a stale external-data file would be silently paired
        old.unlink()
    program.save(str(path), external_data=external)
    return external


def check(path: Path, graph: _Graph, tokenizer, input_names: list[str], tolerance: float) -> tuple[float, float]:
    """Run the ONNX file (ORT CPU) and torch on batches of 2 and 3; (max |Δ| at real positions, max |logit|).

    Batch 3 with a longer sequence than the export's proves both axes are dynamic. Raises TeacherError when the
    difference exceeds ``tolerance`` x the logit scale.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = scale = 0.0
    for texts in (PROBE_TEXTS[:2], PROBE_TEXTS):
        enc = tokenizer(texts, padding=True, return_tensors="np")
        feeds = {n: enc[n].astype(np.int64) for n in input_names}
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            want = graph(*(torch.from_numpy(feeds[n]) for n in input_names)).float().numpy()
        if got.shape != want.shape:
            raise TeacherError(f"export check: ONNX output {got.shape} != torch {want.shape} for batch {len(texts)}")
        real = feeds["attention_mask"].astype(bool) if got.ndim == 3 else np.ones(len(texts), bool)
        diff = float(np.abs(got.astype(np.float32) - want)[real].max())
        worst, scale = max(worst, diff), max(scale, float(np.abs(want[real]).max()))
    if not np.isfinite(worst) or worst > tolerance * max(scale, 1.0):
        raise TeacherError(
            f"export check failed: max |onnx - torch| = {worst:.3g} exceeds {tolerance} x logit scale {scale:.3g}; "
            "the ONNX graph does not compute what the model does (try another --opset, or --dtype fp32)"
        )
    return worst, scale


def hidden_tensors(path: Path, model: nn.Module) -> dict[str, str]:
    """Layer module name -> the ONNX tensor it outputs, for each block of the model's layer stack (``--hidden``).

    The exporter names tensors after FX nodes (``add_4753``); the scope metadata it keeps tells which module a
    node belongs to, and a module's output is the last node inside its scope.
    """
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        return {}
    stack_name, stack = max(stacks, key=lambda item: len(item[1]))
    layers = {f"{stack_name}.{i}" for i in range(len(stack))}
    found: dict[str, str] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        for scope in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")):
            name = scope.removeprefix("model.")  # the _Graph wrapper's attribute
            if name in layers:
                found[name] = node.output[0]
    return dict(sorted(found.items(), key=lambda item: int(item[0].rsplit(".", 1)[1])))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings: stdout's last line is the command's result."""
    exporter_log = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed" warnings
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)
