"""What the torchrun tests of both stages share: finding one rank's process to kill it."""

from __future__ import annotations

from pathlib import Path


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (its child with RANK=rank in its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"PPid:\t{launcher}\n" in status and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None
