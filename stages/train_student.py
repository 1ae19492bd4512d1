"""Stage two: train a student from cached soft targets. The teacher is never run here.

``run(config)`` = ``Trainer(config)`` -> ``setup`` (open and verify caches, build student, loss, loaders; write
config.json, or resume the interrupted run from its last checkpoint) -> ``train`` (progressive hidden-state stages,
then the logit stage; metrics.csv rows every --log-every steps, a checkpoint every --checkpoint-every steps and at
each epoch end) -> ``save`` (weights, ONNX, metrics.json last). ``stages.run_dir`` owns the directory's files.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from stages import cache_format as fmt
from stages import checkpoint, distributed, run_dir, storage
from stages.config import TrainStudentConfig, to_dict
from stages.dataset import FINGERPRINT_OF, Dataset
from stages.errors import CacheError, ConfigError, DatasetError
from stages.evaluate import evaluate, flatten
from stages.export import export_onnx
from stages.hf_students import HFStudent, build_hf_student, is_hf_spec
from stages.loader import StreamingLoader
from stages.losses import EnsembleKDLoss, HiddenStateLoss, KDLoss, cross_entropy_only
from stages.prepare_data import prepared_tokenizer
from stages.students import SEQUENCE, TOKEN, VECTOR, build_student, check_family_fits, count_parameters

# Options that do not change what a run computes: an interrupted run resumes whatever they are now.
_NOT_COMPARED = ("out", "overwrite", "resume", "log_every", "checkpoint_every", "tensorboard", "device", "threads")
_NOT_COMPARED += ("export_onnx", "cache_dir")  # cache_dir only resolves the caches, recorded by path
_NOT_COMPARED += ("dist_timeout",)
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(config: TrainStudentConfig, progress: bool = True, log=print) -> dict:
    """Set up (every check before anything is written), train, save; returns the final metrics.

    progress: a progress bar, the setup line and one line per epoch; False (--quiet) logs only the summary line.
    Under torchrun every rank trains its share of each epoch under DistributedDataParallel; rank 0 alone writes
    the run directory, evaluates and exports, and a failure on any rank fails every rank.
    """
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    group = distributed.init(config.dist_timeout, backend="nccl" if cuda else "gloo")
    trainer = Trainer(config, progress and (group is None or group.main), log, group)
    try:
        distributed.together(group, "setup", trainer.setup)
        with group.collective("training") if group is not None else nullcontext():
            trainer.follow_rank_zero()
            trainer.train()
        metrics = distributed.together(group, "saving the run", trainer.save)
    finally:
        trainer.close()
    distributed.close(group)
    return metrics


class Trainer:
    def __init__(self, config: TrainStudentConfig, progress: bool, log, group: distributed.Group | None = None):
        self.config = config
        self.progress = progress
        self.log = log
        self.group = group  # torchrun's ranks; None for one process
        self.main = group is None or group.main  # the rank that writes, evaluates and exports
        self.world_size = 1 if group is None else group.world_size
        self.history: list[dict] = []  # one row per epoch, every stage counted
        self.frozen: set[int] = set()  # ids of parameters that earlier progressive stages froze
        self.step = 0  # optimizer steps taken, over every stage
        self.stage_index = 0  # stages finished (hidden-state stages first, the logit stage last)
        self.resume_state: dict | None = None  # the checkpoint being resumed, until its stage has taken it
        self.elapsed_before = 0.0  # training seconds of the run's earlier processes (a resumed run)
        self.checkpoint_seconds = 0.0  # spent writing checkpoints, in this process
        self.lock: run_dir.RunLock | None = None
        self._staging: tempfile.TemporaryDirectory | None = None  # where a run bound for an object store trains
        self.rows: run_dir.MetricsLog | None = None  # metrics.csv (and TensorBoard), open from setup on
        self.epoch_acc = _accumulator()  # the current epoch's loss sums
        self.window = _accumulator()  # the loss sums since the last "step" row

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        # Rank 0 alone owns the run directory: it checks, locks, writes and resumes it (the others follow it).
        resuming, replace = self._run_directory()
        if c.tensorboard:
            run_dir.tensorboard_writer_class()  # missing package: say so before any work
        self.device = self._device()
        self.data = Dataset(c.data)
        self.caches = [self._open_cache(ref, self.data) for ref in c.cache]
        self._check_caches()
        self.token_level = (
            self.caches[0].kind == "token"
            if self.caches
            else "input_ids" in self.data.columns and not self.data.has_labels
        )
        self.inputs = self._input_columns()
        kind = TOKEN if self.token_level else SEQUENCE if "input_ids" in self.inputs else VECTOR
        if not is_hf_spec(c.student):  # a transformers model says what it is in its own config
            check_family_fits(c.student, kind, self.inputs)
        if c.alpha < 1 and not self.token_level:
            self._check_labels()
        self.num_outputs = self.caches[0].num_classes if self.caches else self._count_outputs()
        if not self.token_level:
            self._check_label_range(self.data)
        self.temperature = c.temperature or (self.caches[0].temperature if self.caches else 1.0)

        if c.threads:
            torch.set_num_threads(c.threads)
        random.seed(c.seed)
        np.random.seed(c.seed)
        torch.manual_seed(c.seed)
        self.model = self._build_student().to(self.device)
        self.hidden_map = self._layer_map() if c.method == "progressive" else []
        hidden_names = [sorted({name for _, name in self.hidden_map})] + [[] for _ in self.caches[1:]]
        self.train_loader = self._loader(
            self.data,
            self.caches,
            shuffle=True,
            hidden=hidden_names if self.caches else None,
            labelled_only=c.labelled_only,
            ranks=True,
        )
        self._check_ranks()
        self.forward: nn.Module = self.model  # what the training steps call; DDP-wrapped by train() under torchrun
        self.vocab = self._vocab_limit()
        self.eval_set = self._held_out(c.eval_data, c.eval_cache)  # every epoch
        self.test_set = self._held_out(c.test_data, c.test_cache)  # once, at the end
        format_loss = self.caches[0].format.loss(c.alpha, self.temperature) if self.caches else None
        if format_loss is not None:  # a format that feeds one loss of its own (sampled draws)
            self.loss = format_loss
        elif c.method == "ensemble":
            self.loss = EnsembleKDLoss(c.alpha, self.temperature, c.weights or None, c.ensemble_mode)
        else:
            self.loss = KDLoss(c.alpha, self.temperature, c.renormalize)
        record = self._record()
        if resuming:
            run_dir.check_same_run(self.out, record["config"], ignore=_NOT_COMPARED)
        if replace:  # only now that every check passed: a failed setup leaves the old run as it was
            storage.rmtree(self.target)
        if self.group is not None:
            self._note(
                f"{self.world_size} ranks: global batch {c.batch_size * self.world_size} "
                f"({c.batch_size} per rank), each rank reading its share of every epoch"
            )
        self.started = time.perf_counter()
        if not self.main:
            return
        self.lock = run_dir.RunLock(self.out)
        state = checkpoint.load_last(self.out) if resuming else None
        if not resuming:
            run_dir.write_config(self.out, record)
        kept = run_dir.read_rows(self.out)[: state["rows"]] if state else []  # those logged up to the checkpoint
        self.rows = run_dir.MetricsLog(self.out, kept, tensorboard=c.tensorboard)
        if state is not None:
            self._restore(state)
        self._note(
            f"student {c.student} ({count_parameters(self.model):,} parameters) on {self.device} reading "
            f"{'+'.join(self.inputs)}; method {c.method}, alpha {c.alpha}, T {self.temperature}; "
            f"{self.train_loader.num_examples} training examples"
        )

    def _record(self) -> dict:
        """config.json: the resolved configuration (absolute paths, caches by path) and the caches' identities."""
        c = self.config

        def absolute(path: str) -> str:
            return storage.display(path) if path else ""  # an object-store URI stays as given

        def cache_path(ref: str) -> str:
            return str(fmt.resolve_cache(ref, c.cache_dir).resolve()) if ref else ""

        module, colon, rest = c.student.partition(":")
        student = absolute(module) + colon + rest if module.endswith(".py") else c.student
        resolved = to_dict(c) | {
            "data": absolute(c.data),
            "out": str(self.target),
            "cache": [str(cache.path.resolve()) for cache in self.caches],
            "eval_data": absolute(c.eval_data),
            "eval_cache": cache_path(c.eval_cache),
            "test_data": absolute(c.test_data),
            "test_cache": cache_path(c.test_cache),
            "cache_dir": absolute(c.cache_dir),
            "student": student,
            "temperature": self.temperature,
            "layer_map": ",".join(f"{layer}={name}" for layer, name in self.hidden_map),
            "overwrite": False,  # how this command treated --out, not what the run is: never replayed
            "resume": False,
        }
        caches = [
            {
                "key": cache.key,
                "path": str(cache.path.resolve()),
                "teacher": cache.manifest["teacher"]["name"],
                "teacher_sha256": cache.manifest["teacher"]["sha256"],
                "top_k": cache.top_k,
                "temperature": cache.temperature,
            }
            for cache in self.caches
        ]
        return {"config": resolved, "caches": caches, "student_parameters": count_parameters(self.model)}

    def _restore(self, state: dict) -> None:
        """Model, counters and history from a checkpoint; the stage it stopped in takes the rest (``_stage``)."""
        self.model.load_state_dict(state["model"])
        self.step, self.stage_index, self.history = state["step"], state["stage"], state["history"]
        frozen = set(state["frozen"])
        self.frozen = {id(p) for n, p in self.model.named_parameters() if n in frozen}
        self.epoch_acc, self.window = state["epoch_acc"], state["window"]
        self.window["t0"] = time.perf_counter()  # throughput counts this process's time only
        self.elapsed_before = state["elapsed"]
        self.resume_state = state
        self._note(f"resuming {self.out} at step {self.step} (epoch {len(self.history) + 1})")

    def follow_rank_zero(self) -> None:
        """Under torchrun, every rank resumes from the checkpoint rank 0 resumed from (rank 0 owns the directory).

        The ranks' loss sums start afresh: the checkpoint holds rank 0's, which the epoch row adds up over ranks.
        """
        if self.group is None:
            return
        resumed = self.group.gather(self.resume_state is not None, "agreeing where the run resumes")[0]
        if resumed and not self.main:
            self._restore(checkpoint.load_last(self.out))
            self.epoch_acc, self.window = _accumulator(), _accumulator()

    def _note(self, message: str) -> None:
        """Setup and per-epoch lines: shown with the progress bar, left out by --quiet (the summary line stays)."""
        if self.progress:
            self.log(message)

    def _device(self) -> torch.device:
        want = self.config.device
        if want == "cuda" and not torch.cuda.is_available():
            why = "this build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(
                f"--device cuda: torch has no CUDA here (torch {torch.__version__}: {why}); use --device cpu or auto"
            )
        if want == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        if self.group is None:
            return torch.device("cuda")
        torch.cuda.set_device(self.group.local_rank)  # NCCL's device for this rank: its own GPU
        return torch.device("cuda", self.group.local_rank)

    def _check_ranks(self) -> None:
        if self.group is None:
            return
        if len(self.train_loader.units) < self.world_size:
            raise ConfigError(
                f"the training set splits into {len(self.train_loader.units)} unit(s) (cache shards) for "
                f"{self.world_size} ranks; use fewer ranks or a cache with more, smaller shards (--shard-size)"
            )

    def _parallel(self) -> nn.Module:
        """The student wrapped in DDP: gradients averaged over the ranks, rank 0's initial weights broadcast to
        every rank. Built once every rank's setup has passed: DDP's constructor is itself a collective."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _run_directory(self) -> tuple[bool, bool]:
        """(resuming, replacing) --out. A run on an object store trains in a local staging directory (self.out)
        and is uploaded when it finishes, metrics.json last: one there is complete or absent, so it never resumes.
        """
        c = self.config
        self.target = storage.location(c.out)
        if isinstance(self.target, Path):
            self.out = self.target = self.target.resolve()
            if not self.main:
                return False, False
            resuming = run_dir.check_out(self.out, c.overwrite, c.resume)
            return resuming, not resuming and self.out.exists() and any(self.out.iterdir())
        self.out = self.target  # the other ranks write nothing
        if not self.main:
            return False, False
        self.target.mkdir(parents=True, exist_ok=True)  # the bucket exists: checked before any work
        if c.resume:
            raise ConfigError(
                f"--resume: {self.target} is on an object store, where a run is uploaded only once it finished, "
                "so there is nothing to resume; train to a local --out to resume runs"
            )
        replace = self.target.exists() and any(self.target.iterdir())
        if replace and not c.overwrite:
            raise ConfigError(
                f"run directory {self.target} exists and is not empty; choose another --out or pass --overwrite"
            )
        self._staging = tempfile.TemporaryDirectory(prefix="kd-run-")
        self.out = Path(self._staging.name)
        return False, replace

    def _held_out(self, data_path: str, cache_ref: str) -> StreamingLoader | None:
        """The loader of a held-out dataset (with its teacher cache, if given), or None when none was given."""
        if not data_path:
            return None
        data = Dataset(data_path)
        if not self.token_level:
            self._check_label_range(data)
        caches = [self._open_cache(cache_ref, data)] if cache_ref else []
        if caches and not caches[0].format.exact_logp:
            raise CacheError(
                f"cache {caches[0].key} of {data_path} holds sampled targets; agreement and KL need a top-k cache of it"
            )
        return self._loader(data, caches, shuffle=False, top_k=0)  # held-out KL over every cached id

    def _open_cache(self, ref: str, data: Dataset) -> fmt.Cache:
        cache = fmt.open_cache(fmt.resolve_cache(ref, self.config.cache_dir))
        cache.verify(checksums=True)
        if not cache.checksummed:
            self.log(f"note: cache {cache.key} predates manifest checksums; checked against its key and shards only")
        built_from = cache.manifest["dataset"]
        # A cache written before fingerprints hashed the rows holds a fingerprint of the files' names and bytes.
        have = data.fingerprint() if built_from.get("fingerprint_of") == FINGERPRINT_OF else data.file_fingerprint()
        want = built_from["fingerprint"]
        if have != want:
            raise CacheError(
                f"cache {cache.key} was built from another dataset ({cache.manifest['dataset']['path']}, fingerprint "
                f"{want[:12]}) than {data.path} (fingerprint {have[:12]}). Use the cache of this dataset "
                "or run cache-teacher on it."
            )
        return cache

    def _check_caches(self) -> None:
        if not self.caches:
            return
        first = self.caches[0]
        for cache in self.caches[1:]:
            if cache.kind != first.kind or cache.num_classes != first.num_classes:
                raise CacheError(
                    f"caches disagree: {first.key} is {first.kind} with {first.num_classes} outputs, "
                    f"{cache.key} is {cache.kind} with {cache.num_classes}; an ensemble needs one output space"
                )
        if any(cache.format.drawn for cache in self.caches) and self.config.method == "ensemble":
            raise CacheError(
                "--method ensemble mixes top-k caches; sampled caches train with --method kd or progressive"
            )
        if self.config.method == "progressive" and not first.hidden:
            raise CacheError(
                f"--method progressive needs hidden states, and cache {first.key} holds none. "
                "Re-run cache-teacher with --hidden NAME (see `pipeline inspect-teacher`)."
            )

    def _input_columns(self) -> list[str]:
        """The dataset columns the student reads: the token ids, or float vector column(s) concatenated in order.

        Vector columns are those of --inputs, else the teacher's float inputs, else (no cache) the dataset's one
        float column: with several and no teacher to say which, the user names them.
        """
        columns, floats = self.data.columns, _float_columns(self.data)
        if self.config.inputs:
            chosen = self.config.inputs
            if self.token_level or "input_ids" in chosen:
                raise ConfigError(
                    f"--inputs {','.join(chosen)}: --inputs picks float vector columns for a vector student; "
                    "token students read input_ids (and attention_mask) without it"
                )
            bad = [name for name in chosen if name not in floats]
            if bad:
                raise DatasetError(
                    f"--inputs: {bad} of dataset {self.data.path} are not float vector columns; "
                    f"its float columns are {floats or 'none'} (all columns: {columns})"
                )
            return list(chosen)
        if self.token_level:
            cols = ["input_ids"]  # the loader builds the mask; token-level students read ids only
        elif self.caches:
            teacher = [i["name"] for i in self.caches[0].manifest["teacher"]["inputs"]]
            present = [n for n in teacher if n in columns]
            cols = present if "input_ids" in present else [n for n in present if n in floats]
        elif "input_ids" in columns:
            cols = ["input_ids"]
        elif len(floats) > 1:
            raise ConfigError(
                f"dataset {self.data.path} has several float columns {floats} and no teacher cache says which the "
                f"student reads; name them with --inputs, e.g. --inputs {floats[0]} or --inputs {','.join(floats)}"
            )
        else:
            cols = floats
        if not cols or any(col not in columns for col in cols):
            raise DatasetError(
                f"dataset {self.data.path} has no model input column the student can read (token ids 'input_ids' "
                f"or a float vector column); it has {columns}"
            )
        return cols

    def _check_labels(self) -> None:
        if not self.data.has_labels or self.data.labels().null_count == self.data.num_rows:
            fix = (
                "use --alpha 1 to train on the teacher's targets alone"
                if self.caches
                else "cache a teacher on it (cache-teacher) and train on its targets with --cache and --alpha 1"
            )
            raise DatasetError(
                f"alpha {self.config.alpha} < 1 needs labels, but dataset {self.data.path} has none; {fix}"
            )

    def _check_label_range(self, data: Dataset) -> None:
        """Labels must be class indices the student's outputs cover: 0 <= label < num_outputs (nulls allowed)."""
        if not data.has_labels:
            return
        low, high = pc.min_max(data.labels()).values()
        if low.as_py() is None:  # every label is null
            return
        if low.as_py() < 0:
            raise DatasetError(
                f"dataset {data.path} has label {low.as_py()}; labels are class indices 0..{self.num_outputs - 1} "
                "(null, not a negative number, for an unlabelled row)"
            )
        if high.as_py() >= self.num_outputs:
            width, fix = (
                (
                    f"the cache's teacher has {self.num_outputs} classes (cache {self.caches[0].key})",
                    f"use the cache of a teacher with at least {high.as_py() + 1} classes",
                )
                if self.caches
                else (
                    f"the student has {self.num_outputs} outputs, the largest label of {self.data.path} + 1",
                    "train on a dataset that holds every class",
                )
            )
            raise DatasetError(
                f"dataset {data.path} has label {high.as_py()}, outside the classes 0..{self.num_outputs - 1}: "
                f"{width}. Fix the labels, or {fix}"
            )

    def _count_outputs(self) -> int:
        """Outputs of a student trained without a teacher cache (cross-entropy only).

        Token level: the vocabulary of the held-out caches' teacher when one is given (so the student is scored
        against that teacher, like the KD runs it is compared with), else the largest token id + 1 in the data.
        Classification: the largest label + 1 (``_check_labels`` has made sure there are labels).
        """
        c = self.config
        if self.token_level:
            for data_path, ref in ((c.eval_data, c.eval_cache), (c.test_data, c.test_cache)):
                if data_path and ref:
                    return fmt.open_cache(fmt.resolve_cache(ref, c.cache_dir)).num_classes
            return self._max_token() + 1
        return int(pc.max(self.data.labels()).as_py()) + 1

    def _build_student(self) -> nn.Module:
        if is_hf_spec(self.config.student):
            return build_hf_student(
                self.config.student,
                num_outputs=self.num_outputs,
                token_level=self.token_level,
                tokenizer_sha=self.data.tokenizer_sha256,
            )
        c = self.config
        if self.token_level or "input_ids" in self.inputs:
            vocab = self.num_outputs if self.token_level else self._max_token() + 1
            return build_student(
                c.student, num_outputs=self.num_outputs, vocab_size=vocab, wider_outputs=c.truncate_vocab
            )
        first = self.data.read(0, 1, self.inputs)
        shapes = {name: np.asarray(first.column(name)[0].as_py()).shape for name in self.inputs}
        return build_student(c.student, num_outputs=self.num_outputs, input_dim=shapes, wider_outputs=c.truncate_vocab)

    def _max_token(self) -> int:
        paths = [self.data] + [Dataset(p) for p in (self.config.eval_data, self.config.test_data) if p]
        return max(int(pc.max(pc.list_flatten(d.read(0, d.num_rows, ["input_ids"]).column(0))).as_py()) for d in paths)

    def _vocab_limit(self) -> int | None:
        """Teacher V when the student's output is wider (padded vocabulary) and truncation was asked for."""
        if not self.caches:
            return None
        probe = self._first_batch()
        width = self.model(probe.inputs).logits.shape[-1]
        teacher = self.caches[0].num_classes
        if width == teacher:
            return None
        if width > teacher and self.config.truncate_vocab:
            return teacher
        hint = (
            " (the student's vocabulary is padded; pass --truncate-vocab to train on its first V logits)"
            if width > teacher
            else ""
        )
        raise ConfigError(
            f"the student has {width} outputs but the cache's teacher has {teacher}: "
            f"they differ by {width - teacher}{hint}"
        )

    def _layer_map(self) -> list[tuple[int, str]]:
        """(student layer, teacher hidden name) pairs, in student-layer order."""
        available = sorted(self.caches[0].hidden)
        layers = self.model.num_layers
        if self.config.layer_map:
            pairs = []
            for item in self.config.layer_map.split(","):
                left, _, right = item.partition("=")
                if not left.strip().isdigit() or right.strip() not in available or not int(left) < layers:
                    raise ConfigError(
                        f"layer_map item {item!r}: want STUDENT_LAYER=TEACHER_HIDDEN with layer < {layers} "
                        f"and hidden one of {available}"
                    )
                pairs.append((int(left), right.strip()))
            return sorted(pairs)
        if len(available) > layers:
            available = available[-layers:]
        # Spread the teacher's hidden states evenly over the student's layers, last to last.
        return [(round((j + 1) * layers / len(available)) - 1, name) for j, name in enumerate(available)]

    def _loader(
        self,
        data: Dataset,
        caches: list,
        shuffle: bool,
        hidden=None,
        top_k: int | None = None,
        labelled_only=False,
        ranks: bool = False,
    ):
        """``ranks``: this rank's share only (the training set); held-out sets are read whole, by rank 0."""
        loader = StreamingLoader(
            data,
            caches,
            input_columns=self.inputs,
            batch_size=self.config.batch_size,
            token_level=self.token_level,
            hidden=hidden,
            shuffle=shuffle,
            buffer_examples=self.config.buffer,
            seed=self.config.seed,
            top_k=self.config.top_k if top_k is None else top_k,
            labelled_only=labelled_only,
            rank=self.group.rank if ranks and self.group is not None else 0,
            world_size=self.world_size if ranks else 1,
        )
        return loader

    def _first_batch(self):
        """A batch to size projections, check widths and trace the ONNX export with.

        Always epoch 0's first: the same batch wherever training stands, so a resumed run probes and traces alike.
        """
        self.train_loader.set_epoch(0)
        return next(iter(self.train_loader)).to(self.device)

    def _iterate(self, loader: StreamingLoader, epoch: int, skip: int = 0):
        loader.set_epoch(epoch, skip)
        if self.config.workers:
            # Its own generator for the workers' base seed: drawn from torch's global one, it would shift the
            # student's dropout by one draw per epoch, and differently in a run resumed mid-epoch.
            seeds = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            return torch.utils.data.DataLoader(
                loader, batch_size=None, num_workers=self.config.workers, persistent_workers=False, generator=seeds
            )
        return loader

    # -- training -----------------------------------------------------------------------------------------
    def train(self) -> None:
        """Progressive hidden-state stages (method progressive), then the logit stage.

        A resumed run passes over the stages its checkpoint had finished: their effect is in the weights and
        the frozen set the checkpoint restored.
        """
        if self.group is not None:
            self.forward = self._parallel()
        self.started = time.perf_counter()
        for index, (layer, name) in enumerate(self.hidden_map):
            if index >= self.stage_index:
                self.hidden_stage(layer, name)
        self.logit_stage()
        self.train_seconds = self._elapsed()

    def hidden_stage(self, layer: int, name: str) -> None:
        """Train the student up to ``layer`` to match the teacher's hidden state ``name`` (through a projection)."""
        projection = self._projection(layer, name)
        distributed.broadcast_parameters(self.group, projection)  # every rank starts from rank 0's projection
        hidden_loss = HiddenStateLoss(self.config.hidden_loss)
        params = [p for p in self.model.parameters() if id(p) not in self.frozen] + list(projection.parameters())
        self._stage(
            f"hidden:{layer}={name}",
            lambda b: self._hidden_step(b, layer, name, projection, hidden_loss),
            params,
            self.config.stage_epochs,
            {"projection": projection},
        )
        if self.config.freeze_earlier:
            self.frozen |= {id(p) for p in self._params_used(layer, name, projection)}

    def logit_stage(self) -> None:
        """Distil the logits (or train from scratch when alpha is 0), every layer trainable."""
        self._stage("logits", self._kd_step, list(self.model.parameters()), self.config.epochs, {})

    def _optimizer(
        self, params: list[nn.Parameter], epochs: int, first: int | None = None
    ) -> tuple[torch.optim.Optimizer, LambdaLR]:
        """AdamW and its per-step schedule over one stage of ``epochs`` epochs: warm-up, then constant or cosine.

        ``first``: the stage's first epoch number (the loader's shuffle seed); default the next epoch.
        """
        c = self.config
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        first = len(self.history) + 1 if first is None else first
        total = max(sum(self._steps_in(e) for e in range(first, first + epochs)), 1)
        warmup = c.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if c.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))

        return optimizer, LambdaLR(optimizer, factor)

    def _batches_in(self, epoch: int) -> int:
        """Batches of one epoch: this rank's, or the most any rank has (ranks step together: ``even_steps``)."""
        mine = self.train_loader.count_batches(epoch, self.config.workers)
        return distributed.max_over_ranks(self.group, mine, "counting an epoch's batches")

    def _steps_in(self, epoch: int) -> int:
        """Optimizer steps of one epoch: its batches in groups of --grad-accum (the last group may be short)."""
        return -(-self._batches_in(epoch) // self.config.grad_accum)

    def _stage(self, name: str, step, params: list[nn.Parameter], epochs: int, modules: dict[str, nn.Module]) -> None:
        """One stage's epochs under its own optimizer and schedule; picks up a resumed checkpoint of this stage."""
        done, skip = 0, 0  # epochs of this stage finished, batches of the next one taken
        state = self.resume_state if self.resume_state and self.resume_state["stage"] == self.stage_index else None
        if state is not None:
            done, skip = state["stage_epochs"], state["batches"]
        first = len(self.history) + 1 - done
        optimizer, schedule = self._optimizer(params, epochs, first)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.precision == "fp16")
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler"])
            for key, module in modules.items():
                module.load_state_dict(state["modules"][key])
            checkpoint.set_rng_state(state["rng"])  # last: building this stage drew from the generators
            self.resume_state = None
        parts = (optimizer, schedule, scaler, modules)
        bar = tqdm(
            total=sum(self._steps_in(e) for e in range(first, first + epochs)),
            initial=sum(self._steps_in(e) for e in range(first, first + done)) + skip // self.config.grad_accum,
            disable=not self.progress,
            desc=name,
            unit="step",
            leave=False,
        )
        for stage_epoch in range(done, epochs):
            self._epoch(name, step, parts, bar, stage_epoch, skip)
            skip = 0
        bar.close()
        self.stage_index += 1

    def _epoch(self, stage: str, step, parts: tuple, bar: tqdm, stage_epoch: int, skip: int) -> None:
        """One epoch from batch ``skip`` on: ``grad_accum`` batches per optimizer step, rows and checkpoints."""
        optimizer, schedule, scaler = parts[:3]
        c = self.config
        epoch = len(self.history) + 1
        batches = self._batches_in(epoch)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        done = skip
        t0 = time.perf_counter()
        source = self._iterate(self.train_loader, epoch, skip)
        for batch, weight in distributed.even_steps(self.group, source, batches - skip, self._positions):
            batch = batch.to(self.device)
            group = min(c.grad_accum, batches - done // c.grad_accum * c.grad_accum)  # batches in this step
            with torch.autocast(self.device.type, dtype=_AUTOCAST[c.precision], enabled=c.precision != "fp32"):
                out = step(batch)
            # weight: this rank's share of the step's examples (1 with one process; 0 on a rank out of batches)
            scaler.scale(out.total * weight / group).backward()
            done += 1
            if weight:
                for acc in (self.epoch_acc, self.window):
                    _add(acc, out.parts, len(batch.ids), self._positions(batch))
            if done % c.grad_accum and done < batches:
                continue
            if step != self._kd_step:  # a hidden stage runs the bare student and its projection, outside DDP
                distributed.average_gradients(self.group, params, "averaging a hidden stage's gradients")
            if c.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            self.step += 1
            bar.update()
            bar.set_postfix_str(self._speed(self.window, time.perf_counter() - self.window["t0"]))
            if self.step % c.log_every == 0:
                self._log_step(epoch, stage, schedule)
            if self.step % c.checkpoint_every == 0 and done < batches:  # the epoch's end writes its own
                self.epoch_acc["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._checkpoint(stage_epoch, done, parts)
        row = {
            "step": self.step,
            "epoch": epoch,
            "stage": stage,
            "kind": "epoch",
            **_means(self._over_ranks(self.epoch_acc)),
            "seconds": self.epoch_acc["seconds"] + time.perf_counter() - t0,
            "lr": schedule.get_last_lr()[0],
        }
        if self.eval_set is not None and self.main:  # the other ranks go on to the next epoch's first step
            metrics = evaluate(
                self.model, self.eval_set, device=self.device, token_level=self.token_level, vocab=self.vocab
            )
            row.update({f"eval_{k}": v for k, v in metrics.items()})
        self.history.append(row)
        if self.main:
            self.rows.append(row)
        self.epoch_acc = _accumulator()
        self._note("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        self._checkpoint(stage_epoch + 1, 0, parts)

    def _over_ranks(self, acc: dict) -> dict:
        """An accumulator's loss sums and batch count added up over the ranks (itself with one process)."""
        sums, batches = distributed.sum_over_ranks(self.group, acc["sums"], acc["batches"], "averaging the losses")
        return acc | {"sums": sums, "batches": batches}

    def _speed(self, acc: dict, seconds: float) -> str:
        unit = "tokens" if self.token_level else "examples"
        return f"{acc['positions' if self.token_level else 'examples'] / max(seconds, 1e-9):,.0f} {unit}/s"

    def _log_step(self, epoch: int, stage: str, schedule: LambdaLR) -> None:
        """A "step" row: the loss means since the last one, the learning rate, throughput and elapsed time."""
        seconds = max(time.perf_counter() - self.window["t0"], 1e-9)
        row = {
            "step": self.step,
            "epoch": epoch,
            "stage": stage,
            "kind": "step",
            **_means(self.window),
            "lr": schedule.get_last_lr()[0],
            "examples_per_s": self.window["examples"] / seconds,
            "elapsed": self._elapsed(),
        }
        if self.token_level:
            row["tokens_per_s"] = self.window["positions"] / seconds
        if self.main:  # step rows are rank 0's own batches; epoch rows average over every rank's
            self.rows.append(row)
        self.window = _accumulator()

    def _checkpoint(self, stage_epochs: int, batches: int, parts: tuple) -> None:
        """Everything the next step depends on, with the position: ``batches`` taken of epoch ``stage_epochs``.

        Rank 0's alone: the ranks hold the same weights and optimizer state, and each rank's position is the
        same count of steps (``follow_rank_zero`` loads it on the others)."""
        if not self.main:
            return
        started = time.perf_counter()
        optimizer, schedule, scaler, modules = parts
        state = {
            "step": self.step,
            "stage": self.stage_index,
            "stage_epochs": stage_epochs,
            "batches": batches,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "modules": {key: module.state_dict() for key, module in modules.items()},
            "frozen": [n for n, p in self.model.named_parameters() if id(p) in self.frozen],
            "rng": checkpoint.rng_state(),
            "history": self.history,
            "epoch_acc": self.epoch_acc,
            "window": self.window,
            "rows": len(self.rows.rows),
            "elapsed": self._elapsed(),
        }
        checkpoint.save(self.out, self.step, state)
        self.checkpoint_seconds += time.perf_counter() - started

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _positions(self, batch) -> int:
        """What a step's loss is a mean over: target positions (token level) or examples."""
        return int(batch.mask.sum()) if self.token_level else len(batch.ids)

    def _kd_step(self, batch):
        logits, labels, mask, targets = flatten(batch, self.forward(batch.inputs).logits, self.vocab)
        if not self.caches:
            return cross_entropy_only(logits, labels, mask)
        return self.loss(logits, targets if self.config.method == "ensemble" else targets[0], labels, mask)

    def _hidden_step(self, batch, layer: int, name: str, projection: nn.Module, loss: HiddenStateLoss):
        out = self.model(batch.inputs)
        student = out.hidden[layer]
        teacher = batch.hidden[0][name]
        if self.token_level:
            keep = batch.mask
            student, teacher = student[keep], teacher[keep]
        student = student.reshape(student.shape[0], -1)
        return loss(
            projection(student.float()),
            teacher.float(),
            torch.ones(student.shape[0], dtype=torch.bool, device=student.device),
        )

    def _projection(self, layer: int, name: str) -> nn.Module:
        """A learned map from the student's width to the teacher's; identity when they already match."""
        batch = self._first_batch()
        with torch.no_grad():
            student = self.model(batch.inputs).hidden[layer]
        width = student.shape[-1] if self.token_level else int(np.prod(student.shape[1:]))
        target = int(np.prod(self.caches[0].hidden[name]))
        return (nn.Identity() if width == target else nn.Linear(width, target)).to(self.device)

    def _params_used(self, layer: int, name: str, projection: nn.Module) -> list[nn.Parameter]:
        """Student parameters the hidden-state loss of this stage reaches (its gradient is non-zero)."""
        self.model.zero_grad(set_to_none=True)
        self._hidden_step(
            self._first_batch(), layer, name, projection, HiddenStateLoss(self.config.hidden_loss)
        ).total.backward()
        used = [p for p in self.model.parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        self.model.zero_grad(set_to_none=True)
        return used

    # -- saving -------------------------------------------------------------------------------------------
    def save(self) -> dict:
        """Rank 0 writes the run directory and returns the metrics; any other rank has nothing to write ({})."""
        if not self.main:
            return {}
        c = self.config
        save_model(self.model, str(self.out / run_dir.WEIGHTS))
        if isinstance(self.model, HFStudent):  # also a transformers folder: from_pretrained, generate
            if not self.model.save_pretrained(self.out / run_dir.HF, prepared_tokenizer(self.data)):
                self.log(f"note: {self.out / run_dir.HF} has no tokenizer; copy the teacher's tokenizer files into it")
        metrics = {
            "method": c.method,
            "alpha": c.alpha,
            "temperature": self.temperature,
            "student": c.student,
            "epochs": len(self.history),
            "ranks": self.world_size,
            "global_batch_size": c.batch_size * self.world_size,
            "train_seconds": round(self.train_seconds, 2),
            "steps": self.step,
            "cache_keys": [cache.key for cache in self.caches],
        }
        final = self.history[-1] if self.history else {}
        metrics.update({k: v for k, v in final.items() if k.startswith(("train_", "eval_"))})
        if self.test_set is not None:
            test = evaluate(
                self.model, self.test_set, device=self.device, token_level=self.token_level, vocab=self.vocab
            )
        else:  # no separate test set: the held-out eval set's final figures are the test figures
            test = {k[5:]: v for k, v in final.items() if k.startswith("eval_")}
        metrics.update({"test_" + k: v for k, v in test.items()})
        if c.export_onnx:
            example = self._first_batch()
            small = {k: v[:4].cpu() for k, v in example.inputs.items()}
            self.model.eval()
            metrics["onnx_max_abs_diff"] = export_onnx(self.model.cpu(), small, self.out / run_dir.ONNX)
            self.model.to(self.device)
        run_dir.write_metrics(self.out, metrics)
        if self._staging is not None:  # the run is complete: upload it, metrics.json last
            storage.upload_tree(self.out, self.target, last=run_dir.METRICS, skip=(run_dir.LOCK,))
        figures = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test_"))
        self.log(f"run saved to {self.target}: {figures or 'no test figures (give --eval-data or --test-data)'}")
        return metrics

    def close(self) -> None:
        """Let go of the run directory (also after a failure: the run is then interrupted, and resumable)."""
        if self.rows is not None:
            self.rows.close()
        if self.lock is not None:
            self.lock.release()
        if self._staging is not None:  # uploaded by save, or a failed run: nothing there to resume
            self._staging.cleanup()


def _accumulator() -> dict:
    """Loss-part sums over batches, with the examples and target positions they covered, since ``t0``."""
    return {"sums": {}, "batches": 0, "examples": 0, "positions": 0, "seconds": 0.0, "t0": time.perf_counter()}


def _add(acc: dict, parts: dict[str, float], examples: int, positions: int) -> None:
    for key, value in parts.items():
        acc["sums"][key] = acc["sums"].get(key, 0.0) + value
    acc["batches"] += 1
    acc["examples"] += examples
    acc["positions"] += positions


def _means(acc: dict) -> dict[str, float]:
    return {f"train_{key}": value / max(acc["batches"], 1) for key, value in acc["sums"].items()}


def _float_columns(data: Dataset) -> list[str]:
    """Columns holding (possibly nested) lists of floats: the candidates for a vector student's input."""
    found = []
    for name in data.columns:
        kind, depth = data.schema.field(name).type, 0
        while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            kind, depth = kind.value_type, depth + 1
        if depth and pa.types.is_floating(kind):
            found.append(name)
    return found
