"""The training loop of stage two: ``Trainer`` with the shape ``setup`` -> ``train`` -> ``save`` -> ``close``.

``setup`` checks everything before anything is written (``stages.train_inputs``), builds the student, its loss and
loaders, and writes config.json or resumes the interrupted run from its last checkpoint. ``train`` runs the
progressive hidden-state stages, then the logit stage: metrics.csv rows every --log-every steps, a checkpoint every
--checkpoint-every steps and at each epoch end. ``save`` evaluates and hands the final files to
``stages.train_outputs``, which owns the run directory's writing.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from stages import checkpoint, distributed, run_dir
from stages.config import TrainStudentConfig
from stages.errors import ConfigError, TrainingError
from stages.evaluate import evaluate, flatten
from stages.loader import StreamingLoader
from stages.losses import EnsembleKDLoss, KDLoss, cross_entropy_only
from stages.prepare_data import prepared_tokenizer
from stages.progressive import HiddenStage
from stages.students import count_parameters
from stages.train_inputs import Inputs
from stages.train_outputs import LossMeter, RunOutputs

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """One process's share of a run: ``setup``, ``follow_rank_zero`` (torchrun), ``train``, ``save``, ``close``."""

    def __init__(self, config: TrainStudentConfig, progress: bool, log, group: distributed.Group | None = None):
        self.config = config
        self.progress = progress
        self.log = log
        self.group = group  # torchrun's ranks; None for one process
        self.main = group is None or group.main  # the rank that writes, evaluates and exports
        self.world_size = 1 if group is None else group.world_size
        self.outputs = RunOutputs(config, self.main)
        self.history: list[dict] = []  # one row per epoch, every stage counted
        self.frozen: set[int] = set()  # ids of parameters that earlier progressive stages froze
        self.step = 0  # optimizer steps taken, over every stage
        self.stage_index = 0  # stages finished (hidden-state stages first, the logit stage last)
        self.resume_state: dict | None = None  # the checkpoint being resumed, until its stage has taken it
        self.elapsed_before = 0.0  # training seconds of the run's earlier processes (a resumed run)
        self.checkpoint_seconds = 0.0  # spent writing checkpoints, in this process

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        # Rank 0 alone owns the run directory: it checks, locks, writes and resumes it (the others follow it).
        resuming, replace = self.outputs.open()
        if c.tensorboard:
            run_dir.tensorboard_writer_class()  # missing package: say so before any work
        self.device = distributed.device(c.device, self.group)
        self.inputs = inputs = Inputs(c, self.log)
        self.token_level = inputs.token_level
        self.caches = inputs.caches
        self.meter = LossMeter(self.token_level)
        if c.threads:
            torch.set_num_threads(c.threads)
        random.seed(c.seed)
        np.random.seed(c.seed)
        torch.manual_seed(c.seed)
        self.model = inputs.build_student().to(self.device)
        self.hidden_map = inputs.layer_map(self.model.num_layers) if c.method == "progressive" else []
        hidden_names = [sorted({name for _, name in self.hidden_map})] + [[] for _ in self.caches[1:]]
        self.train_loader = inputs.loader(
            inputs.data,
            self.caches,
            shuffle=True,
            hidden=hidden_names if self.caches else None,
            labelled_only=c.labelled_only,
            rank=0 if self.group is None else self.group.rank,
            world_size=self.world_size,
        )
        self._check_ranks()
        self.forward: nn.Module = self.model  # what the training steps call; DDP-wrapped by train() under torchrun
        self.vocab = self._vocab_limit()
        self.eval_set = inputs.held_out(c.eval_data, c.eval_cache)  # every epoch
        self.test_set = inputs.held_out(c.test_data, c.test_cache)  # once, at the end
        format_loss = self.caches[0].format.loss(c.alpha, inputs.temperature) if self.caches else None
        if format_loss is not None:  # a format that feeds one loss of its own (sampled draws)
            self.loss = format_loss
        elif c.method == "ensemble":
            self.loss = EnsembleKDLoss(c.alpha, inputs.temperature, c.weights or None, c.ensemble_mode)
        else:
            self.loss = KDLoss(c.alpha, inputs.temperature, c.renormalize)
        parameters = count_parameters(self.model)
        record = self.outputs.record(self.caches, inputs.temperature, self.hidden_map, parameters, self.world_size)
        if resuming:
            self.outputs.check_same_run(record)
        if replace:  # only now that every check passed: a failed setup leaves the old run as it was
            self.outputs.replace()
        if self.group is not None:
            self._note(
                f"{self.world_size} ranks: global batch {c.batch_size * self.world_size} "
                f"({c.batch_size} per rank), each rank reading its share of every epoch"
            )
        self.started = time.perf_counter()
        if not self.main:
            return
        state = self.outputs.start(record, resuming)
        if state is not None:
            self._restore(state)
        self._note(
            f"student {c.student} ({parameters:,} parameters) on {self.device} reading "
            f"{'+'.join(inputs.columns)}; method {c.method}, alpha {c.alpha}, T {inputs.temperature}; "
            f"{self.train_loader.num_examples} training examples"
        )

    def _restore(self, state: dict) -> None:
        """Model, counters and history from a checkpoint; the stage it stopped in takes the rest (``_stage``)."""
        self.model.load_state_dict(state["model"])
        self.step, self.stage_index, self.history = state["step"], state["stage"], state["history"]
        frozen = set(state["frozen"])
        self.frozen = {id(p) for n, p in self.model.named_parameters() if n in frozen}
        self.meter.epoch, self.meter.window = state["epoch_acc"], state["window"]
        self.meter.window["t0"] = time.perf_counter()  # throughput counts this process's time only
        self.elapsed_before = state["elapsed"]
        self.resume_state = state
        self._note(f"resuming {self.outputs.out} at step {self.step} (epoch {len(self.history) + 1})")

    def follow_rank_zero(self) -> None:
        """Under torchrun, every rank resumes from the checkpoint rank 0 resumed from (rank 0 owns the directory).

        The ranks' loss sums start afresh: the checkpoint holds rank 0's, which the epoch row adds up over ranks.
        """
        if self.group is None:
            return
        resumed = self.group.gather(self.resume_state is not None, "agreeing where the run resumes")[0]
        if resumed and not self.main:
            self._restore(checkpoint.load_last(self.outputs.out))
            self.meter = LossMeter(self.token_level)

    def _note(self, message: str) -> None:
        """Setup and per-epoch lines: shown with the progress bar, left out by --quiet (the summary line stays)."""
        if self.progress:
            self.log(message)

    def _check_finite(self, parts: dict[str, float], epoch: int) -> None:
        """Stop at the first NaN or infinite loss: what trains from there is not a student (fp16 excepted: its
        gradient scaler skips such steps itself)."""
        bad = {k: v for k, v in parts.items() if not math.isfinite(v)}
        if bad and self.config.precision != "fp16":
            raise TrainingError(
                f"the training loss became {', '.join(f'{k} = {v}' for k, v in bad.items())} at step {self.step + 1} "
                f"(epoch {epoch}); lower --lr, check --temperature and the student's outputs. The run stops here, "
                "unfinished"
            )

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
        c = self.config
        hidden = HiddenStage(
            self.model, layer, name, self.caches[0].hidden[name], self._first_batch(), self.token_level, c.hidden_loss
        )
        projection = hidden.projection
        distributed.broadcast_parameters(self.group, projection)  # every rank starts from rank 0's projection
        params = [p for p in self.model.parameters() if id(p) not in self.frozen] + list(projection.parameters())
        self._stage(f"hidden:{layer}={name}", hidden.step, params, c.stage_epochs, {"projection": projection})
        if c.freeze_earlier:
            self.frozen |= {id(p) for p in hidden.params_used(self._first_batch())}

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
                self._check_finite(out.parts, epoch)
                self.meter.add(out.parts, len(batch.ids), self._positions(batch))
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
            bar.set_postfix_str(self.meter.speed())
            if self.step % c.log_every == 0:
                row = self.meter.step_row(self.step, epoch, stage, schedule.get_last_lr()[0], self._elapsed())
                if self.main:  # step rows are rank 0's own batches; epoch rows average over every rank's
                    self.outputs.rows.append(row)
            if self.step % c.checkpoint_every == 0 and done < batches:  # the epoch's end writes its own
                self.meter.epoch["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._checkpoint(stage_epoch, done, parts)
        lr, seconds = schedule.get_last_lr()[0], time.perf_counter() - t0
        row = self.meter.epoch_row(self.group, self.step, epoch, stage, lr, seconds)
        if self.eval_set is not None and self.main:  # the other ranks go on to the next epoch's first step
            metrics = evaluate(
                self.model, self.eval_set, device=self.device, token_level=self.token_level, vocab=self.vocab
            )
            row.update({f"eval_{k}": v for k, v in metrics.items()})
        self.history.append(row)
        if self.main:
            self.outputs.rows.append(row)
        self._note("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        self._checkpoint(stage_epoch + 1, 0, parts)

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
            "epoch_acc": self.meter.epoch,
            "window": self.meter.window,
            "rows": len(self.outputs.rows.rows),
            "elapsed": self._elapsed(),
        }
        checkpoint.save(self.outputs.out, self.step, state)
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

    def _vocab_limit(self) -> int | None:
        """Teacher V when the student's output is wider (padded vocabulary) and truncation was asked for."""
        if not self.caches:
            return None
        return self.inputs.vocab_limit(self.model(self._first_batch().inputs).logits.shape[-1])

    # -- saving -------------------------------------------------------------------------------------------
    def save(self) -> dict:
        """Rank 0 writes the run directory and returns the metrics; any other rank has nothing to write ({})."""
        if not self.main:
            return {}
        c = self.config
        metrics = {
            "method": c.method,
            "alpha": c.alpha,
            "temperature": self.inputs.temperature,
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
        example = self._first_batch().inputs if c.export_onnx else None
        self.outputs.save(self.model, metrics, prepared_tokenizer(self.inputs.data), example, self.log)
        return metrics

    def close(self) -> None:
        """Let go of the run directory (also after a failure: the run is then interrupted, and resumable)."""
        self.outputs.close()
