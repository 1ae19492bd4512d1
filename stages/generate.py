"""Greedy samples from a trained Hugging Face causal-LM student, or from its ONNX teacher, to see what distillation did.

The student is read back from the run's ``hf/`` folder with ``AutoModelForCausalLM.from_pretrained`` (the same
path a user takes) and decoded with ``generate``. The teacher is the ONNX file of the run's first cache, run in
ONNX Runtime without a KV cache (each new token re-reads the whole sequence: fine for a short sample), with the
tokenizer that export-teacher saved beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stages.cache_format import MANIFEST
from stages.errors import ConfigError
from stages.hf_source import load_tokenizer, require_transformers
from stages.run_dir import CONFIG, is_run, read_config
from stages.run_dir import HF as HF_DIR


def run(
    run_dir: str | Path, prompt: str, *, max_new_tokens: int = 32, teacher: bool = False, chat: bool = False
) -> str:
    """The greedy continuation (new text only) of ``prompt``; ``chat`` wraps it as a user turn first."""
    run_dir = Path(run_dir)
    if teacher:
        onnx_path = _teacher_path(run_dir)
        tokenizer = load_tokenizer(onnx_path.parent)
        ids = _encode(tokenizer, prompt, chat)
        out = _onnx_greedy(onnx_path, ids, max_new_tokens, tokenizer.eos_token_id)
    else:
        folder = run_dir / HF_DIR
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{run_dir} has no {HF_DIR}/ folder; generate needs a run trained with --student hf:DIR")
        transformers = require_transformers()
        tokenizer = load_tokenizer(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        if not model.can_generate():
            raise ConfigError(f"the student in {folder} is not a causal LM; generate needs one")
        ids = _encode(tokenizer, prompt, chat)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )[0].tolist()
    return tokenizer.decode(out[len(ids) :], skip_special_tokens=True)


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat needs a tokenizer with a chat template; this one has none (drop --chat)")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def _teacher_path(run_dir: Path) -> Path:
    if not is_run(run_dir):
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG})")
    caches = read_config(run_dir).get("caches") or []
    if not caches:
        raise ConfigError(f"run {run_dir} was trained without a teacher cache; there is no teacher to sample")
    manifest = json.loads((Path(caches[0]["path"]) / MANIFEST).read_text())
    path = Path(manifest["teacher"]["path"])
    if not path.is_file():
        raise ConfigError(f"the run's teacher {path} no longer exists")
    return path


def _onnx_greedy(path: Path, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ids = list(ids)
    for _ in range(max_new_tokens):
        x = np.array([ids], dtype=np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        (logits,) = session.run(None, {n: feeds[n] for n in names})
        if logits.ndim != 3:
            raise ConfigError(
                f"the teacher {path} is not a language model (logits {logits.shape}); --teacher needs one"
            )
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids
