"""Target formats: one class per way a cache stores the teacher's soft targets.

Each format owns its shard columns, what it adds to a cache's request (its key) and manifest, the checks of its
manifest fields and list sizes, how shard rows decode into arrays, the batch targets and loss they feed, its
DuckDB columns and statistics, and the words reports use for it. Callers ask the format object instead of
comparing ``target_format`` strings, so a new format is one new class (a module here) registered in ``FORMATS``.

Torch stays out of this module's imports (the catalog commands read formats without loading it); the two
methods that build tensors import the losses when called.
"""

from __future__ import annotations

from typing import Any

from stages.errors import CacheError
from stages.formats.base import (
    DEFAULT_FORMAT,
    TargetFormat,
    by_id,
    fixed_list,
    flat,
    padded,
    ragged_list,
)
from stages.formats.sampled import Sampled
from stages.formats.topk import INT8_LEVELS, TopK, TopKFp16, TopKInt8

__all__ = [
    "DEFAULT_FORMAT",
    "ENCODINGS",
    "FORMATS",
    "INT8_LEVELS",
    "Sampled",
    "TOP_P_ENCODINGS",
    "TargetFormat",
    "TopK",
    "TopKFp16",
    "TopKInt8",
    "by_id",
    "config_format",
    "fixed_list",
    "flat",
    "format_of",
    "get_format",
    "padded",
    "ragged_list",
    "view_columns",
]

ENCODINGS: dict[str, TopK] = {e.encoding: e for e in (TopK(), TopKFp16(), TopKInt8())}
TOP_P_ENCODINGS: dict[str, TopK] = {e.encoding: type(e)(ragged=True) for e in ENCODINGS.values()}
FORMATS: dict[str, TargetFormat] = {f.name: f for f in (ENCODINGS["fp32"], Sampled())}


def get_format(name: str, encoding: str = "fp32", top_p: bool = False) -> TargetFormat:
    """The format called ``name``, top-k in ``encoding``, with ragged top-p lists if ``top_p``
    (config.problems() has refused unknown names and top-p sampled caches from users)."""
    if name == TopK.name and encoding in ENCODINGS:
        return (TOP_P_ENCODINGS if top_p else ENCODINGS)[encoding]
    if name in FORMATS and encoding == "fp32" and not top_p:
        return FORMATS[name]
    raise CacheError(
        f"unknown target format {name!r} in encoding {encoding!r}{' with top-p' if top_p else ''}; this pipeline "
        f"reads {sorted(FORMATS)}, top-k in {sorted(ENCODINGS)} (top-p only for top-k)"
    )


def config_format(config: Any) -> TargetFormat:
    """The format a cache-teacher config writes."""
    return get_format(config.target_format, config.encoding, config.top_p < 1)


def format_of(manifest: dict) -> TargetFormat:
    """A cache's format, from its manifest (a manifest without an encoding predates them: fp32; one without top_p
    predates top-p: fixed k)."""
    top_p = manifest.get("top_p")
    return get_format(
        manifest.get("target_format", DEFAULT_FORMAT), manifest.get("encoding", "fp32"), top_p is not None
    )


def view_columns(of: TargetFormat | None) -> str:
    """The `positions` view's target columns for one cache: its format's own (decoded), every other format's as
    NULLs (``of`` None: all NULLs, for the view over no caches)."""
    return ", ".join(
        of.sql_columns() if of is not None and f.name == of.name else f.null_columns for f in FORMATS.values()
    )
