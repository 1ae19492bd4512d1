"""Local Hugging Face sources: model folders, GGUF files and tokenizers, opened offline with clear errors.

Everything here reads the local disk only (``local_files_only``): a Hub id is refused with the command that
downloads it, so a run never depends on the network. ``tokenizer_sha256`` is the identity of a tokenizer that
prepare-data, cache-teacher and train-student compare, so a student is never distilled across vocabularies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach for the Hub
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def require_transformers() -> Any:
    """The transformers module, or a ConfigError naming the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "this command needs Hugging Face transformers: pip install 'kd-pipeline[hf]' "
            "(or pip install transformers tokenizers)"
        ) from exc
    transformers.logging.set_verbosity_error()  # its advisory warnings would bury our one-line messages
    transformers.logging.disable_progress_bar()  # per-file load/save bars: noise on stderr for small models
    return transformers


def check_local(src: str | Path, what: str) -> Path:
    """``src`` as an existing local path; a Hub id (``org/name``) gets the download command instead."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    text = str(src)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        raise ConfigError(
            f"{what} {text!r} does not exist locally; it looks like a Hugging Face Hub id, and this pipeline works "
            f"offline. Download the folder first: hf download {text} --local-dir models/{text.split('/')[1]}, "
            "then pass that folder"
        )
    raise ConfigError(f"{what} {text!r} does not exist")


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def has_weights(folder: Path) -> bool:
    """True for a checkpoint folder (weights present), False for a config-only folder."""
    return any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def load_tokenizer(src: str | Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a model folder, an export folder, a ``tokenizer.json`` file, or a GGUF file."""
    transformers = require_transformers()
    path = check_local(src, "tokenizer")
    if path.is_file() and path.suffix == ".json":
        try:
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions with parse details
            raise ConfigError(f"{path} is not a tokenizers JSON file: {exc}") from exc
    if is_gguf(path):
        _require_gguf()
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if not path.is_dir():
        raise ConfigError(f"tokenizer {path} is neither a folder, a tokenizer.json nor a .gguf file")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); copy the tokenizer files of the model "
            "into it (tokenizer.save_pretrained(folder)) or pass --tokenizer pointing at them"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if not tokenizer.is_fast:
        raise ConfigError(f"the tokenizer in {path} has no fast (Rust) version; convert it to tokenizer.json first")
    return tokenizer


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's canonical JSON (vocabulary, merges, normaliser, special tokens).

    Computed from the loaded tokenizer rather than file bytes, so a copy saved elsewhere hashes the same; the
    runtime padding/truncation settings, which encoding calls change, are left out.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as exc:
        raise ConfigError("reading a .gguf file needs the gguf package: pip install gguf") from exc
