"""Exact training checkpoints under a run directory's ``checkpoints/``: written atomically, the last few kept.

A checkpoint is one torch file holding everything the next step depends on: model, optimizer, lr schedule and
grad scaler states, the RNG states (python, numpy, torch and CUDA), the loader's position and the trainer's
counters. Loading it and continuing gives the same weights as never having stopped (bitwise on CPU).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from stages.errors import ConfigError
from stages.run_dir import CHECKPOINTS

KEEP = 3  # checkpoints kept: the newest is enough to resume; older ones cover a file lost after its write
_PREFIX, _SUFFIX = "step-", ".pt"


def rng_state() -> dict:
    """Every generator training draws from. numpy's keys travel as a tensor so the file loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "gauss": [has_gauss, gauss],
    }
    state = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], *n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def paths(run: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a ``.tmp`` left by a kill mid-write is not one)."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX))


def save(run: Path, step: int, state: dict, keep: int = KEEP) -> Path:
    """Write ``state`` as the checkpoint of ``step``: to a temp name, then renamed, so a kill leaves no torn file."""
    folder = run / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    path = folder / f"{_PREFIX}{step:09d}{_SUFFIX}"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in paths(run)[:-keep] + list(folder.glob("*.tmp")):  # .tmp: torn by a kill (the lock makes us the writer)
        old.unlink()
    return path


def load_last(run: Path) -> dict | None:
    """The newest checkpoint's state, or None when the run has none yet."""
    found = paths(run)
    if not found:
        return None
    try:
        return torch.load(found[-1], weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file; each means the same to the user
        raise ConfigError(
            f"checkpoint {found[-1]} cannot be read ({type(exc).__name__}: {exc}); delete it to resume from the one "
            "before, or pass --overwrite to start the run over"
        ) from exc


def step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX) : -len(_SUFFIX)])
