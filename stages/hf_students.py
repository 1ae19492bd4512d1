"""Hugging Face students: ``--student hf:DIR`` trains a ``transformers`` model with the project's losses.

DIR is a config folder (``config.json`` only: random initialisation) or a checkpoint folder (weights too:
initialised from them, e.g. a smaller model of the teacher's tokenizer). The task follows from the data: a
token-level cache trains a causal LM, a classifier cache a sequence classifier; ``hf:DIR?task=causal-lm`` or
``?task=sequence-classification`` overrides it, which a config without ``architectures`` needs.

The wrapper keeps the student protocol (``forward(inputs) -> StudentOutput``, ``num_layers``) and can write
itself back with ``save_pretrained`` (weights, config, tokenizer), loadable by ``AutoModelFor*`` and able to
``generate``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import Tensor, nn

from stages.errors import ConfigError
from stages.hf_source import check_local, has_weights, load_tokenizer, require_transformers, tokenizer_sha256
from stages.student_models import StudentOutput

PREFIX = "hf:"
TASKS = ("causal-lm", "sequence-classification")


class HFStudent(nn.Module):
    """A transformers model behind the student protocol. ``model`` is the transformers module itself."""

    def __init__(self, model: nn.Module, task: str, folder: Path, tokenizer_sha: str | None):
        super().__init__()
        self.model = model
        self.task = task
        self.folder = folder
        self.tokenizer_sha256 = tokenizer_sha  # None when the folder holds no tokenizer
        self.num_layers = int(model.config.num_hidden_layers)
        self._accepts = set(inspect.signature(model.forward).parameters)

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        kwargs = {k: v for k, v in inputs.items() if k in self._accepts}
        if self.task == "causal-lm":
            kwargs["use_cache"] = False
        out = self.model(**kwargs, output_hidden_states=True)
        return StudentOutput(out.logits, list(out.hidden_states[1:]))  # [0] is the embedding output, not a layer

    def save_pretrained(self, folder: Path, tokenizer_source: str | None) -> bool:
        """Weights + config (+ generation config) + tokenizer: the student folder's, else ``tokenizer_source``.

        Returns False when neither holds a tokenizer (data not made by prepare-data and a bare config folder):
        the model is saved all the same, and the caller says which files to add.
        """
        self.model.save_pretrained(folder)
        source = self.folder if self.tokenizer_sha256 else tokenizer_source
        if source is not None:
            load_tokenizer(source).save_pretrained(folder)
        return source is not None


def is_hf_spec(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def build_hf_student(spec: str, *, num_outputs: int, token_level: bool, tokenizer_sha: str | None) -> HFStudent:
    """The model ``hf:DIR[?task=...]`` names; a classifier's head gets ``num_outputs`` classes.

    ``tokenizer_sha``: the data's tokenizer (prepare-data's, the teacher's), or None when unknown. A student that
    brings another tokenizer, or a causal LM whose vocabulary cannot hold the teacher's ids, is refused: the
    cached ids are the teacher's tokens.
    """
    transformers = require_transformers()
    target, _, query = spec.strip().removeprefix(PREFIX).partition("?")
    folder = check_local(target, "student folder")
    task = _task(query, spec) or ("causal-lm" if token_level else "sequence-classification")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"student folder {folder} has no config.json; hf:DIR needs a Hugging Face model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the student config in {folder}: {exc}") from exc
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    if task == "sequence-classification":
        config.num_labels = num_outputs  # the head follows the teacher's classes (names kept when the count agrees)
    try:
        if has_weights(folder):
            model = auto.from_pretrained(
                folder, config=config, local_files_only=True, dtype=torch.float32, ignore_mismatched_sizes=True
            )
        else:
            model = auto.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build a {task} student from {folder}: {exc}") from exc
    own = _own_tokenizer_sha(folder)
    if own and tokenizer_sha and own != tokenizer_sha:
        raise ConfigError(
            f"the student's tokenizer in {folder} (sha256 {own[:12]}) is not the one the data and teacher use "
            f"(sha256 {tokenizer_sha[:12]}); distil into a student of the teacher's tokenizer"
        )
    if task == "causal-lm" and model.config.vocab_size < num_outputs:
        raise ConfigError(
            f"student {folder} has a vocabulary of {model.config.vocab_size} but the teacher's is {num_outputs}; "
            "distil into a student built for the teacher's tokenizer"
        )
    return HFStudent(model, task, folder, own)


def _own_tokenizer_sha(folder: Path) -> str | None:
    """The sha256 of the folder's tokenizer, or None when it has none (a bare config folder)."""
    try:
        return tokenizer_sha256(load_tokenizer(folder))
    except ConfigError:
        return None


def _task(query: str, spec: str) -> str | None:
    if not query:
        return None
    key, _, value = query.partition("=")
    if key != "task" or value not in TASKS:
        raise ConfigError(f"student spec {spec!r}: the only option of hf:DIR is ?task=, one of {', '.join(TASKS)}")
    return value
