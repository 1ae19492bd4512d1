"""Self-consistency of a cache manifest: its key, its request, its copies of the request's fields, its shard list.

Pure checks on the parsed JSON (no files). ``stages.cache_format.open_cache`` runs them on every manifest it
opens; for a cache written before manifests carried a checksum they are the protection against hand edits.
"""

from __future__ import annotations

from pathlib import Path

from stages.errors import CacheError
from stages.formats import DEFAULT_FORMAT, format_of


def manifest_problem(m: dict, request_key: str | None) -> str:
    """How a manifest contradicts itself, or '' if it does not. ``request_key``: the key its request hashes to.

    The key is the hash of the request, so the request's fields (top_k, temperature, target format, hidden
    names, teacher and dataset) cannot be edited unseen, and the manifest's own copies must equal them.
    """
    request, teacher, dataset, shards = m["request"], m["teacher"], m["dataset"], m["shards"]
    if not all(isinstance(x, dict) for x in (request, teacher, dataset)):
        return "has a malformed request, teacher or dataset entry"
    hidden = m.get("hidden") or {}
    if not isinstance(hidden, dict) or not all(
        isinstance(shape, list) and all(_is_count(d) for d in shape) for shape in hidden.values()
    ):
        return f"has malformed hidden-state shapes {hidden!r}"
    if request_key != m["key"]:
        return f"has the key {m['key']!r}, which is not the hash of its request (the request or the key was changed)"
    target_format = m.get("target_format", DEFAULT_FORMAT)
    try:
        layout = format_of(m)
    except CacheError as exc:
        return f"names a target format this pipeline cannot read ({exc})"
    copies = {
        "target_format": target_format,
        "temperature": m["temperature"],
        "teacher_sha256": teacher.get("sha256"),
        "logits_output": teacher.get("logits_output"),
        "dataset_fingerprint": dataset.get("fingerprint"),
        "hidden": sorted(hidden),
    }
    for field, value in copies.items():
        if field in request and request[field] != value:
            return f"says {field} {value!r}, but the request the cache was built for (its key) says {request[field]!r}"
    if m.get("format_version") != layout.format_version:
        version = m.get("format_version")
        return f"says format_version {version!r}, but {layout.describe(m)} targets are version {layout.format_version}"
    problem = layout.manifest_problem(m)
    if problem:
        return problem
    if not isinstance(shards, list) or not shards:
        return "lists no shards"
    for s in shards:
        fields_ok = isinstance(s, dict) and {"file", "rows", "sha256", "examples"} <= s.keys()
        if not fields_ok or Path(str(s["file"])).name != s["file"] or not _is_count(s["rows"]):
            return f"has a malformed shard entry {s!r}"
        examples = s["examples"]
        if not (isinstance(examples, list) and len(examples) == 2 and all(_is_count(e) for e in examples)):
            return f"has a malformed example range in shard entry {s!r}"
    edges = [s["examples"] for s in shards]
    contiguous = edges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    if not contiguous or edges[-1][1] != dataset.get("num_rows"):
        return f"has shards whose example ranges {edges} do not tile the dataset's {dataset.get('num_rows')} rows"
    one_per_example = teacher.get("kind") == "classifier"  # stages.teacher.CLASSIFIER (importing it loads onnxruntime)
    for s in shards:
        examples = s["examples"][1] - s["examples"][0]
        if s["rows"] < examples or (one_per_example and s["rows"] != examples):
            return f"says shard {s['file']} has {s['rows']} positions for {examples} examples"
    total = sum(s["rows"] for s in shards)
    if m["num_positions"] != total:
        return f"says num_positions {m['num_positions']!r}, but its shards hold {total}"
    return ""


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
