"""Both stages under ``torchrun``: the process group its environment describes, and the few collectives the
stages use.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it starts. Without
them, or with a world of one, ``init`` returns None and a stage runs as the single process it always was.
Every collective waits at most ``timeout`` seconds, and a peer that died, failed or did not answer becomes a
DistributedError (one line, exit 1) instead of a hang; torchrun also stops the other ranks of a failed job.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stages.errors import ConfigError, DistributedError, PipelineError


@dataclass(frozen=True)
class Group:
    """This process's place in a torchrun job: ``rank`` of ``world_size``, ``local_rank`` on its host (its GPU)."""

    rank: int
    world_size: int
    local_rank: int
    timeout: float  # seconds any collective waits for the other ranks

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes what there is one of (the manifest, the run directory)."""
        return self.rank == 0

    def gather(self, obj: Any, what: str) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank; also a barrier."""
        out: list[Any] = [None] * self.world_size
        with self.collective(what):
            dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: torch.Tensor, what: str, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced over the ranks, in place."""
        with self.collective(what):
            dist.all_reduce(tensor, op)
        return tensor

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Communication with the other ranks (also DDP's gradient all-reduce) that fails with a clear message."""
        try:
            yield
        except (RuntimeError, ValueError) as exc:  # DistBackendError and gloo/NCCL failures are RuntimeErrors
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed, because another rank stopped, failed or did "
                f"not answer within {self.timeout:g}s ({detail}). The job stops; re-run the same command to resume."
            ) from exc


def init(timeout: float, backend: str = "gloo") -> Group | None:
    """Join the process group torchrun describes; None when this process was not launched as one of several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"cannot join the torchrun job (WORLD_SIZE {world_size}, MASTER_ADDR "
                f"{os.environ.get('MASTER_ADDR')!r}, MASTER_PORT {os.environ.get('MASTER_PORT')!r}): {exc}. "
                "Launch with torchrun, which sets these, and check that every rank can reach the master."
            ) from exc
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), timeout)


def device(want: str, group: Group | None) -> torch.device:
    """The device this process trains on: ``want`` (--device cpu, cuda or auto), and under torchrun its own GPU."""
    if want == "cuda" and not torch.cuda.is_available():
        why = "this build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(
            f"--device cuda: torch has no CUDA here (torch {torch.__version__}: {why}); use --device cpu or auto"
        )
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if group is None:
        return torch.device("cuda")
    torch.cuda.set_device(group.local_rank)  # NCCL's device for this rank: its own GPU
    return torch.device("cuda", group.local_rank)


def close(group: Group | None) -> None:
    """Leave the process group after a successful run (a failed one just exits: its peers see it gone)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def together(group: Group | None, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it fails on any rank with a PipelineError, it fails on every rank.

    The failed rank raises its own error; the others say which rank failed and why, so no rank trains on while
    another has stopped (a rank that crashes outright is caught by the next collective instead).
    """
    if group is None:
        return fn()
    try:
        result, failure = fn(), None
    except PipelineError as exc:
        result, failure = None, exc
    failures = group.gather(None if failure is None else str(failure), what)
    if failure is not None:
        raise failure
    for rank, message in enumerate(failures):
        if message is not None:
            raise DistributedError(f"rank {rank} failed in {what}, so every rank stops: {message}")
    return result


def even_steps(
    group: Group | None, batches: Iterable, steps: int, size: Callable[[Any], int]
) -> Iterator[tuple[Any, float]]:
    """(batch, loss weight) for ``steps`` steps on every rank, however many batches this rank has.

    DDP averages gradients over ranks, and ranks must take the same optimizer steps. Weighting a rank's mean
    loss by ``world_size * size(batch) / (size summed over ranks)`` makes that average the mean over every
    rank's examples (positions) of the step, as one process with the global batch would take it. A rank whose
    batches ran out repeats its last one at weight 0: it joins the all-reduce and adds nothing.
    One process: every batch at weight 1.
    """
    if group is None:
        yield from ((batch, 1.0) for batch in batches)
        return
    source, last = iter(batches), None
    for _ in range(steps):
        batch = next(source, None)
        last = batch if batch is not None else last
        mine = 0 if batch is None else size(batch)
        total = int(group.all_reduce(torch.tensor([mine], dtype=torch.int64), "weighting a step"))
        yield last, group.world_size * mine / max(total, 1)


def max_over_ranks(group: Group | None, value: int, what: str) -> int:
    """The largest ``value`` of any rank (this rank's own with one process)."""
    if group is None:
        return value
    return int(group.all_reduce(torch.tensor([value], dtype=torch.int64), what, op=dist.ReduceOp.MAX))


def sum_over_ranks(group: Group | None, sums: dict[str, float], count: int, what: str) -> tuple[dict[str, float], int]:
    """Per-key sums and their count, each added up over the ranks (their ratio: a mean over every rank's batches)."""
    if group is None:
        return sums, count
    keys = sorted(sums)
    reduced = group.all_reduce(torch.tensor([float(count)] + [sums[k] for k in keys], dtype=torch.float64), what)
    return dict(zip(keys, reduced[1:].tolist())), int(reduced[0])


def broadcast_parameters(group: Group | None, module: torch.nn.Module) -> None:
    """Rank 0's parameters of ``module`` on every rank (what DDP does for the modules it wraps)."""
    if group is None:
        return
    with group.collective("sharing rank 0's parameters"):
        for p in module.parameters():
            dist.broadcast(p.data, 0)


def average_gradients(group: Group | None, params: list[torch.nn.Parameter], what: str) -> None:
    """Each gradient averaged over the ranks, for modules trained outside DDP (a progressive stage's)."""
    if group is None:
        return
    with group.collective(what):
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= group.world_size
