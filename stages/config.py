"""One dataclass per command's configuration: a config file (TOML or JSON) plus command-line overrides.

Unknown keys are rejected and every problem is reported at once, so a user fixes a config in one go. The
resolved configuration is saved with every cache and run (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stages.errors import ConfigError
from stages.formats import ENCODINGS, FORMATS

DEVICES = ("auto", "cpu", "cuda")
POSTPROCESS = ("auto", "host", "graph")
METHODS = ("kd", "ensemble", "progressive")
LR_SCHEDULES = ("constant", "cosine")
TARGET_FORMATS = tuple(FORMATS)
ENSEMBLE_MODES = ("prob", "logit")  # mix probabilities, or average logits
HIDDEN_LOSSES = ("mse", "cosine")
T_MIN, T_MAX = 1e-3, 1e3  # temperatures accepted: outside, float32 logits / T overflow or flatten to uniform
PRECISIONS = ("fp32", "bf16", "fp16")
DIST_TIMEOUT = 1800.0  # torchrun: long enough for the slowest rank's last shard or epoch, short of a hang


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
    batch_size: int = 64  # examples per teacher call, at most; logits_budget_mb may make a call smaller
    # MiB of float32 logits [positions, V] one teacher call may return: positions per call <= budget / (4 V),
    # padding included (256 positions at V = 262,144). Bounds memory whatever the vocabulary; one sequence
    # longer than that still runs alone. Batching never changes the cached content.
    logits_budget_mb: int = 256
    device: str = "auto"  # auto: CUDA when ONNX Runtime can load it, else CPU
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per core
    hidden: list[str] = field(default_factory=list)  # intermediate tensors to cache as float16
    logits_output: str = ""  # teacher output holding logits; empty = the first output
    shard_size: int = 0  # examples per shard (the resume unit); 0 = 16384 for classifiers, 512 for token teachers
    # where top-k runs: host (one pass over the logits on the CPU, fastest there), graph (TopK in the ONNX graph:
    # only [.., k] leaves the GPU); auto: graph where CUDA really runs, else host. "torch", its old name, means host.
    postprocess: str = "auto"
    pad_token_id: int = 0  # fills padded token inputs; padded positions are never cached
    probe_positions: int = 512  # positions on which dense fidelity statistics are measured at cache time
    target_format: str = "topk"  # topk: the k most likely ids; sampled: ids drawn from the teacher, with counts
    samples: int = 64  # sampled format: draws per position (unbiased in expectation, unlike top-k)
    sample_seed: int = 0  # sampled format: the draws are a function of (seed, row, position), not of batching
    # top-k log-probs on disk: fp32 exact; fp16 (|error| <= 2^-11 |log p|); int8 (8-bit codes, the top-k rescaled to
    # 1 - tail_mass, the tail exact). fp32 stays the default: exact, and the key of every existing cache.
    encoding: str = "fp32"
    # top-p: keep per position the smallest prefix of the top-k whose probability reaches top_p, at least min_k
    # and at most top_k ids (ragged lists; the tail mass stays exact). 1.0: off, exactly top_k ids as before.
    top_p: float = 1.0
    min_k: int = 1  # top-p: the fewest ids a position keeps
    num_workers: int = 1  # launcher-free jobs (SLURM array, Kubernetes) that split the shards; torchrun sets its own
    worker_index: int = 0  # this launcher-free job's index in [0, num_workers): it writes shards s with s % W == I
    dist_timeout: float = DIST_TIMEOUT  # torchrun: seconds a rank waits for the others before the job fails

    def __post_init__(self) -> None:
        if self.postprocess == "torch":  # the name of host until it replaced torch.topk; saved configs say it
            self.postprocess = "host"

    def problems(self) -> list[str]:
        out = []
        if not self.teacher:
            out.append("teacher: required (path to an ONNX model)")
        if not self.data:
            out.append("data: required (a Parquet file or directory)")
        if self.top_k < 0:
            out.append(f"top_k: {self.top_k} must be >= 1 (or 0 for all classes up to 32)")
        if not T_MIN <= self.temperature <= T_MAX:
            out.append(
                f"temperature: {self.temperature} must be in [{T_MIN:g}, {T_MAX:g}] (T divides the logits; "
                "beyond that range float32 logits overflow or every distribution is flat)"
            )
        if self.batch_size < 1:
            out.append(f"batch_size: {self.batch_size} must be >= 1")
        if self.logits_budget_mb < 1:
            out.append(f"logits_budget_mb: {self.logits_budget_mb} must be >= 1 (MiB of logits per teacher call)")
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
        if self.target_format not in TARGET_FORMATS:
            out.append(f"target_format: {self.target_format!r} must be one of {TARGET_FORMATS}")
        drawn = self.target_format in FORMATS and FORMATS[self.target_format].drawn
        if drawn and not 1 <= self.samples <= 32_767:
            out.append(f"samples: {self.samples} must be in [1, 32767] (counts are stored as int16)")
        if self.encoding not in ENCODINGS:
            out.append(f"encoding: {self.encoding!r} must be one of {tuple(ENCODINGS)}")
        elif drawn and self.encoding != "fp32":
            out.append(f"encoding: {self.encoding} applies to top-k log-probs; sampled targets store counts")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            out.append(f"top_p: {self.top_p} must be in (0, 1] (the probability each position's kept ids reach)")
        elif self.top_p < 1 and drawn:
            out.append("top_p: applies to top-k targets; sampled targets keep every distinct id drawn")
        if self.min_k < 1:
            out.append(f"min_k: {self.min_k} must be >= 1 (every position keeps at least its top-1)")
        elif self.top_k > 0 and self.min_k > self.top_k:
            out.append(f"min_k: {self.min_k} must be <= top_k {self.top_k} (top_k is the most ids a position keeps)")
        if self.min_k != 1 and self.top_p == 1:
            out.append(f"min_k: {self.min_k} applies with top_p < 1; without --top-p every position keeps top_k ids")
        if drawn and self.postprocess == "graph":
            out.append("postprocess: graph computes top-k only; sampled targets need --postprocess host")
        if len(set(self.hidden)) != len(self.hidden):
            out.append(f"hidden: {self.hidden} names a tensor twice")
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            out.append(
                f"num_workers {self.num_workers} / worker_index {self.worker_index}: want num_workers >= 1 and "
                "0 <= worker_index < num_workers"
            )
        if not self.dist_timeout > 0:
            out.append(f"dist_timeout: {self.dist_timeout} must be > 0 seconds")
        return out


C = TypeVar("C")


def load_config(cls: type[C], config_file: str | None, overrides: dict[str, Any]) -> C:
    """Build ``cls`` from an optional file, then overrides (None values are 'not given'); validate all at once."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(_options_of(_read_file(config_file)))
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    known = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"unknown key '{k}' (known: {', '.join(known)})" for k in values if k not in known]
    kwargs = {}
    for k, v in values.items():
        if k not in known:
            continue
        default = (
            known[k].default_factory() if known[k].default_factory is not dataclasses.MISSING else known[k].default
        )
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


def _options_of(data: dict[str, Any]) -> dict[str, Any]:
    """The options in a config file. A saved record (a run's config.json, a cache's request.json) keeps them
    under "config", beside what describes the result (cache keys, sizes), so the record is a config file too."""
    return data["config"] if isinstance(data.get("config"), dict) else data


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class TrainStudentConfig:
    data: str = ""  # training dataset (required); must be the dataset every cache was built from
    cache: list[str] = field(default_factory=list)  # cache paths, keys or key prefixes; one per teacher
    out: str = ""  # run directory (required)
    student: str = "mlp"  # family[:options] or module:function (see README, "Students")
    inputs: list[str] = field(default_factory=list)  # float columns a vector student reads; empty = the teacher's
    method: str = "kd"  # kd | ensemble | progressive
    alpha: float = 0.5  # weight of the distillation term; 0 = from scratch (no cache needed), 1 = teacher only
    temperature: float = 0.0  # distillation T; 0 = the cache's own T (no re-tempering)
    epochs: int = 10  # epochs of the final (logit) stage
    batch_size: int = 64  # examples per step, per rank under torchrun (the global batch is this times the ranks)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    lr_schedule: str = "constant"  # constant | cosine (to 0 over each stage's steps)
    warmup_steps: int = 0  # linear warm-up from 0 to lr over the first steps of each stage
    seed: int = 0  # seeds torch, the shuffle, and initialisation: same seed, same run
    labelled_only: bool = False  # train on the labelled rows only; the caches still cover (and pair with) every row
    eval_data: str = ""  # held-out dataset evaluated every epoch
    eval_cache: str = ""  # the teacher's cache of eval_data: adds agreement and KL to the teacher
    test_data: str = ""  # evaluated once after training (test_* metrics); default: eval_data's final figures
    test_cache: str = ""  # the teacher's cache of test_data
    top_k: int = 0  # use only the first k of each cache's ids (exact: the tail grows by what is dropped); 0 = all
    cache_dir: str = field(default_factory=default_cache_root)  # where cache keys are looked up
    weights: list[float] = field(default_factory=list)  # ensemble weights, one per cache (default uniform)
    ensemble_mode: str = "prob"  # prob: mixture of probabilities; logit: average of logits
    renormalize: bool = False  # KD within the top-k only (no tail bucket)
    layer_map: str = ""  # progressive: "student_layer=teacher_hidden,..."; empty = spread evenly
    hidden_loss: str = "mse"  # progressive hidden-state loss: mse | cosine
    stage_epochs: int = 2  # progressive: epochs per hidden-state stage
    freeze_earlier: bool = False  # progressive: freeze layers trained in earlier stages
    truncate_vocab: bool = False  # student vocabulary padded beyond the teacher's: train on the first V logits
    buffer: int = 8192  # examples per shuffle window: bounds the loader's memory
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # torch device for the student: auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch default. 1 is faster for tiny students on a busy machine
    export_onnx: bool = True  # write and check student.onnx
    overwrite: bool = False  # replace an existing run directory
    resume: bool = False  # continue the interrupted run in `out` (running the same command again does it too)
    log_every: int = 10  # optimizer steps per metrics.csv "step" row
    checkpoint_every: int = 1000  # optimizer steps per checkpoint (one is also written at each epoch end)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the student's forward; losses stay fp32
    grad_accum: int = 1  # batches whose gradients add up into one optimizer step
    max_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this before each step; 0 = no clipping
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    dist_timeout: float = DIST_TIMEOUT  # torchrun: seconds a rank waits for the others (rank 0 evaluating)

    def problems(self) -> list[str]:
        out = []
        if not self.data:
            out.append("data: required (the training dataset)")
        if not self.out:
            out.append("out: required (the run directory)")
        if self.method not in METHODS:
            out.append(f"method: {self.method!r} must be one of {METHODS}")
        if not 0 <= self.alpha <= 1:
            out.append(f"alpha: {self.alpha} must be in [0, 1] (weight of the distillation term)")
        if not (self.temperature == 0 or T_MIN <= self.temperature <= T_MAX):
            out.append(
                f"temperature: {self.temperature} must be in [{T_MIN:g}, {T_MAX:g}] (or 0 for the cache's own T)"
            )
        if self.alpha > 0 and not self.cache:
            out.append(f"cache: alpha {self.alpha} > 0 needs at least one --cache (alpha 0 trains from scratch)")
        if self.method == "kd" and len(self.cache) > 1:
            out.append(
                f"cache: {len(self.cache)} caches given with --method kd; use --method ensemble for several teachers"
            )
        if self.method != "ensemble" and self.weights:
            out.append(f"weights: given with --method {self.method}; they weigh the caches of --method ensemble")
        if self.method != "progressive" and self.layer_map:
            out.append(f"layer_map: given with --method {self.method}; only --method progressive uses it")
        if self.method == "ensemble" and self.weights and len(self.weights) != len(self.cache):
            out.append(f"weights: {len(self.weights)} weights for {len(self.cache)} caches; give one per cache")
        if not all(0 < w < math.inf for w in self.weights):
            out.append(f"weights: {self.weights} must all be finite and > 0")
        if not 0 <= self.weight_decay < math.inf:
            out.append(f"weight_decay: {self.weight_decay} must be finite and >= 0")
        for split in ("eval", "test"):
            if getattr(self, f"{split}_cache") and not getattr(self, f"{split}_data"):
                out.append(f"{split}_cache: given without --{split}-data, the dataset it is a cache of")
        if self.ensemble_mode not in ENSEMBLE_MODES:
            out.append(f"ensemble_mode: {self.ensemble_mode!r} must be one of {ENSEMBLE_MODES}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            out.append(f"hidden_loss: {self.hidden_loss!r} must be one of {HIDDEN_LOSSES}")
        for name in ("epochs", "batch_size", "buffer"):
            if getattr(self, name) < 1:
                out.append(f"{name}: {getattr(self, name)} must be >= 1")
        if self.stage_epochs < 0 or self.workers < 0 or self.threads < 0:
            out.append(
                f"stage_epochs ({self.stage_epochs}), workers ({self.workers}) and threads ({self.threads}) "
                "must be >= 0"
            )
        if self.top_k < 0:
            out.append(f"top_k: {self.top_k} must be >= 1 (or 0 for every cached id)")
        if not 0 < self.lr < math.inf:
            out.append(f"lr: {self.lr} must be finite and > 0")
        if self.device not in DEVICES:
            out.append(f"device: {self.device!r} must be one of {DEVICES}")
        if self.lr_schedule not in LR_SCHEDULES:
            out.append(f"lr_schedule: {self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if self.warmup_steps < 0:
            out.append(f"warmup_steps: {self.warmup_steps} must be >= 0")
        for name in ("log_every", "checkpoint_every", "grad_accum"):
            if getattr(self, name) < 1:
                out.append(f"{name}: {getattr(self, name)} must be >= 1")
        if not self.max_grad_norm >= 0:
            out.append(f"max_grad_norm: {self.max_grad_norm} must be >= 0 (0 = no clipping)")
        if self.precision not in PRECISIONS:
            out.append(f"precision: {self.precision!r} must be one of {PRECISIONS}")
        if self.resume and self.overwrite:
            out.append("resume and overwrite both given: resume continues the run in --out, overwrite discards it")
        if not self.dist_timeout > 0:
            out.append(f"dist_timeout: {self.dist_timeout} must be > 0 seconds")
        return out
