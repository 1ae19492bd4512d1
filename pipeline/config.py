"""One dataclass per command's configuration: a config file (TOML or JSON) plus command-line overrides.

Unknown keys are rejected and every problem is reported at once, so a user fixes a config in one go. The
resolved configuration is saved with every cache and run (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
POSTPROCESS = ("auto", "torch", "graph")
METHODS = ("kd", "ensemble", "progressive")


def default_cache_root() -> str:
    """$KD_CACHE_DIR, else ~/.cache/kd-pipeline: caches outlive any one project checkout."""
    return os.environ.get("KD_CACHE_DIR") or str(Path.home() / ".cache" / "kd-pipeline")


@dataclass
class CacheTeacherConfig:
    teacher: str = ""  # path to the ONNX teacher (required)
    data: str = ""  # Parquet file or directory (required)
    top_k: int = 0  # ids cached per position (0: all classes up to 32); the tail mass keeps the rest exact
    temperature: float = 1.0  # T of the cached softmax; students may re-temper
    cache_dir: str = field(default_factory=default_cache_root)  # root under which <key>/ is created
    batch_size: int = 64  # examples per teacher call
    device: str = "auto"  # auto: CUDA when ONNX Runtime can load it, else CPU
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per core
    hidden: list[str] = field(default_factory=list)  # intermediate tensors to cache as float16
    logits_output: str = ""  # teacher output holding logits; empty = the first output
    shard_size: int = 0  # examples per shard (the resume unit); 0 = 16384 for classifiers, 512 for token teachers
    postprocess: str = "auto"  # where top-k runs: torch (fast on CPU), graph (in ONNX; keeps logits on GPU)
    pad_token_id: int = 0  # fills padded token inputs; padded positions are never cached
    probe_positions: int = 512  # positions on which dense fidelity statistics are measured at cache time

    def problems(self) -> list[str]:
        out = []
        if not self.teacher:
            out.append("teacher: required (path to an ONNX model)")
        if not self.data:
            out.append("data: required (a Parquet file or directory)")
        if self.top_k < 0:
            out.append(f"top_k: {self.top_k} must be >= 1 (or 0 for all classes up to 32)")
        if not self.temperature > 0:
            out.append(f"temperature: {self.temperature} must be > 0 (T divides the logits)")
        if self.batch_size < 1:
            out.append(f"batch_size: {self.batch_size} must be >= 1")
        if self.device not in DEVICES:
            out.append(f"device: {self.device!r} must be one of {DEVICES}")
        if self.postprocess not in POSTPROCESS:
            out.append(f"postprocess: {self.postprocess!r} must be one of {POSTPROCESS}")
        if self.threads < 0:
            out.append(f"threads: {self.threads} must be >= 0")
        if self.shard_size < 0:
            out.append(f"shard_size: {self.shard_size} must be >= 0")
        if self.probe_positions < 0:
            out.append(f"probe_positions: {self.probe_positions} must be >= 0")
        if len(set(self.hidden)) != len(self.hidden):
            out.append(f"hidden: {self.hidden} names a tensor twice")
        return out


C = TypeVar("C")


def load_config(cls: type[C], config_file: str | None, overrides: dict[str, Any]) -> C:
    """Build ``cls`` from an optional file, then overrides (None values are 'not given'); validate all at once."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(_read_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    known = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"unknown key '{k}' (known: {', '.join(known)})" for k in values if k not in known]
    kwargs = {}
    for k, v in values.items():
        if k not in known:
            continue
        default = known[k].default_factory() if known[k].default_factory is not dataclasses.MISSING else known[k].default
        try:
            kwargs[k] = _coerce(v, default)
        except (TypeError, ValueError):
            problems.append(f"{k}: {v!r} is not a valid {type(default).__name__}")
    config = cls(**kwargs)
    problems += config.problems()
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if isinstance(default, list):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(default, (int, float, str)):
        return type(default)(value)
    return value


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {p} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table of keys, not {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
