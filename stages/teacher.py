"""An ONNX teacher under ONNX Runtime: load, inspect, expose hidden states, pick the provider, run.

The kind of teacher follows from its logits output: rank 2 ``[batch, classes]`` is a classifier (one
distribution per example); rank 3 ``[batch, seq, vocab]`` is a token-level teacher (one per position).

Two ways to turn logits into cached targets:
- ``host``: ORT returns the full logits and ``stages.topk_kernel`` reduces them in one read. Fastest on CPU
  (benchmarks/cache_throughput.py measures both).
- ``graph``: top-k and the log-partition are appended to a copy of the ONNX graph, so only ``[.., k]`` values,
  ids and ``logZ`` leave the session. On CUDA that keeps the full logits on the device.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from stages.errors import TeacherError

CLASSIFIER = "classifier"
TOKEN = "token"
TOPK_IDS, TOPK_LOGP, TOPK_LOGZ = "kd_topk_ids", "kd_topk_logp", "kd_logz"
CUDA_PROVIDER = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class TeacherInput:
    name: str
    dtype: type  # numpy dtype the model declares
    shape: tuple  # ints for fixed axes, strings or None for dynamic ones


@dataclass(frozen=True)
class ExternalFile:
    """One external-data file of a teacher: its name as the graph spells it (relative to the model's folder)."""

    location: str
    bytes: int
    sha256: str


@dataclass
class TeacherInfo:
    path: str
    sha256: str  # the teacher's identity (``teacher_identity``): the graph and every external-data file
    inputs: list[TeacherInput]
    logits_output: str
    kind: str  # CLASSIFIER or TOKEN
    num_classes: int | None  # vocabulary size for token teachers; None until known if the axis is dynamic
    hidden: list[str] = field(default_factory=list)
    external_data: list[ExternalFile] = field(default_factory=list)  # sorted by location; empty if self-contained


def teacher_identity(graph_sha256: str, external: list[ExternalFile]) -> str:
    """sha256 of everything the session reads: the graph file's bytes (``graph_sha256``, their sha256) and each
    external-data file's name and bytes.

    A self-contained model's identity is the sha256 of its file, as it always was, so its old caches still hit.
    With external data the names count too (``external`` is in location order), so swapping two files' contents
    changes the identity even though the set of bytes is the same.
    """
    if not external:
        return graph_sha256
    h = hashlib.sha256(graph_sha256.encode())
    for f in external:
        h.update(b"\0" + f.location.encode() + b"\0" + f.sha256.encode())
    return h.hexdigest()


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in a graph: initializers and node attributes, subgraphs (If/Loop bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub)


def external_files(model: onnx.ModelProto, folder: Path) -> list[ExternalFile]:
    """The external-data files the graph references, hashed (streamed: a multi-GB file is never held in memory)."""
    locations = set()
    functions = (tensor for function in model.functions for tensor in _node_tensors(function.node))
    for tensor in itertools.chain(_all_tensors(model.graph), functions):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.add(entries.get("location", ""))
    files = []
    for location in sorted(locations):
        # ONNX resolves external data against the model's folder and ORT refuses anything outside it.
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise TeacherError(
                f"the teacher's external-data location {location!r} is not a relative path inside {folder}; "
                "re-save the model with its external data next to it (onnx.save_model(..., location=NAME))"
            )
        path = folder / location
        if not path.is_file():
            raise TeacherError(
                f"the teacher's external-data file {location!r} is missing from {folder}; "
                "copy it next to the .onnx file that references it"
            )
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        files.append(ExternalFile(location, path.stat().st_size, digest))
    return files


def parse_model(path: Path, data: bytes) -> onnx.ModelProto:
    """The graph in the file ``path`` whose bytes are ``data`` (its external data left on disk: ORT reads it from
    the model's folder)."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends; the type is not stable across versions
        raise TeacherError(
            f"{path} is not an ONNX model ({type(exc).__name__}: {exc}). Export the teacher to ONNX first."
        ) from exc
    if not model.graph.node or not model.graph.output:
        raise TeacherError(f"{path} is not a usable ONNX model: its graph has no nodes or no outputs")
    return model


def _dims(value_info: onnx.ValueInfoProto) -> tuple:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return tuple(dims)


def is_static(dim) -> bool:
    """A graph dimension fixed to a number (not a name, not unknown)."""
    return isinstance(dim, int) and dim > 0


def is_past(name: str) -> bool:
    """A key/value-cache input of a decoder exported with its cache (``past_key_values.0.key``, ``past.0``)."""
    return name.startswith(("past_key_values", "past.", "past_"))


def can_generate(name: str) -> bool:
    """Whether the pipeline makes this token-teacher input when the dataset has no column for it."""
    return name in ("attention_mask", "token_type_ids", "position_ids", "use_cache_branch") or is_past(name)


def generated_input(inp: TeacherInput, mask: np.ndarray) -> np.ndarray:
    """A token teacher's input the dataset does not hold, for a batch whose real tokens ``mask`` [B, S] marks.

    attention_mask: the mask; token_type_ids: zeros; position_ids: each token's index among its row's real
    tokens (padding gets 0); a decoder exported with its key/value cache: an empty cache (the first dynamic axis
    the batch, every other dynamic axis 0: the past length) and ``use_cache_branch`` false, so the logits are
    those of a plain forward pass over the whole sequence.
    """
    batch, width = mask.shape
    if inp.name == "attention_mask":
        return mask.astype(inp.dtype)
    if inp.name == "token_type_ids":
        return np.zeros((batch, width), dtype=inp.dtype)
    if inp.name == "position_ids":
        return np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(inp.dtype)
    if inp.name == "use_cache_branch":
        return np.zeros([d if is_static(d) else 1 for d in inp.shape], dtype=inp.dtype)
    dynamic = [i for i, d in enumerate(inp.shape) if not is_static(d)]
    shape = [d if i not in dynamic else (batch if i == dynamic[0] else 0) for i, d in enumerate(inp.shape)]
    return np.zeros(shape, dtype=inp.dtype)


def tensor_names(model: onnx.ModelProto) -> list[str]:
    """Every tensor a node produces, in graph order: the candidates for ``--hidden``."""
    return [o for node in model.graph.node for o in node.output if o]


def check_hidden(model: onnx.ModelProto, names: list[str]) -> None:
    """Raise TeacherError unless every name is a tensor of the graph."""
    known = set(tensor_names(model)) | {o.name for o in model.graph.output}
    missing = [n for n in names if n not in known]
    if missing:
        candidates = [n for n in tensor_names(model) if not n.startswith("val_")][:20]
        raise TeacherError(
            f"hidden tensor(s) {missing} are not in the teacher graph. Some tensors it has: {candidates}. "
            "Run `pipeline inspect-teacher MODEL` for the full list."
        )


def add_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Expose intermediate tensors as graph outputs (in place), so the teacher need not be re-exported."""
    check_hidden(model, names)
    existing = {o.name for o in model.graph.output}
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for name in names:
        if name in existing:
            continue
        vi = inferred.get(name)
        if vi is None:
            vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        model.graph.output.append(vi)


def add_topk_head(model: onnx.ModelProto, logits: str, k: int, temperature: float) -> None:
    """Append ``logZ = ReduceLogSumExp(z/T)`` and ``TopK(z/T) - logZ`` to the graph (in place)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise TeacherError(f"in-graph top-k needs ONNX opset >= 13; the teacher uses {opset}. Use --postprocess host.")
    scaled = f"{logits}__kd_scaled"
    nodes = [
        helper.make_node(
            "Constant", [], ["kd_T"], value=helper.make_tensor("kd_T", TensorProto.FLOAT, [], [temperature])
        ),
        helper.make_node("Constant", [], ["kd_k"], value=helper.make_tensor("kd_k", TensorProto.INT64, [1], [k])),
        helper.make_node(
            "Constant", [], ["kd_axis"], value=helper.make_tensor("kd_axis", TensorProto.INT64, [1], [-1])
        ),
        helper.make_node("Cast", [logits], [f"{logits}__kd_f32"], to=TensorProto.FLOAT),
        helper.make_node("Div", [f"{logits}__kd_f32", "kd_T"], [scaled]),
        helper.make_node("TopK", [scaled, "kd_k"], ["kd_topk_values", TOPK_IDS], axis=-1, largest=1, sorted=1),
    ]
    if opset >= 18:
        nodes.append(helper.make_node("ReduceLogSumExp", [scaled, "kd_axis"], ["kd_logz_keep"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceLogSumExp", [scaled], ["kd_logz_keep"], axes=[-1], keepdims=1))
    nodes += [
        helper.make_node("Sub", ["kd_topk_values", "kd_logz_keep"], [TOPK_LOGP]),
        helper.make_node("Squeeze", ["kd_logz_keep", "kd_axis"], [TOPK_LOGZ]),
    ]
    model.graph.node.extend(nodes)
    model.graph.output.extend(
        [
            helper.make_tensor_value_info(TOPK_IDS, TensorProto.INT64, None),
            helper.make_tensor_value_info(TOPK_LOGP, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(TOPK_LOGZ, TensorProto.FLOAT, None),
        ]
    )


def inspect(path: str | Path, logits_output: str | None = None) -> tuple[TeacherInfo, onnx.ModelProto, bytes]:
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher model not found: {path}")
    data = path.read_bytes()
    # The hash runs on another core while protobuf parses the same bytes (hashlib lets go of the GIL): the two
    # took 0.67 s each for a 1.2 GB teacher, one after the other.
    with ThreadPoolExecutor(1) as pool:
        graph_sha256 = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        model = parse_model(path, data)
    initializers = {i.name for i in model.graph.initializer}
    inputs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        elem = vi.type.tensor_type.elem_type
        np_type = helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
        inputs.append(TeacherInput(vi.name, np.dtype(np_type).type, _dims(vi)))
    outputs = {o.name: o for o in model.graph.output}
    name = logits_output or model.graph.output[0].name
    if name not in outputs:
        raise TeacherError(f"teacher has no output named '{name}'; its outputs are {list(outputs)}")
    shape = _dims(outputs[name])
    if len(shape) == 2:
        kind = CLASSIFIER
    elif len(shape) == 3:
        kind = TOKEN
    else:
        raise TeacherError(
            f"teacher output '{name}' has rank {len(shape)} {shape}; expected [batch, classes] (classifier) "
            "or [batch, seq, vocab] (token-level). Choose the logits with --logits-output."
        )
    num_classes = shape[-1] if isinstance(shape[-1], int) and shape[-1] > 0 else None
    external = external_files(model, Path(path).parent)
    identity = teacher_identity(graph_sha256.result(), external)
    info = TeacherInfo(str(Path(path)), identity, inputs, name, kind, num_classes, external_data=external)
    return info, model, data


class Teacher:
    """A teacher session: ``run`` returns the logits (or, with the top-k head, its ids, logp and logZ), then
    the hidden states."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        device_id: int = 0,
        threads: int = 0,
        hidden: list[str] | None = None,
        logits_output: str | None = None,
        topk_in_graph: tuple[int, float] | None = None,
        inspected: tuple[TeacherInfo, onnx.ModelProto, bytes] | None = None,
    ):
        """``inspected``: what ``inspect(path, logits_output)`` returned, so a large model is read and hashed once;
        its graph may be None (then parsed again from the bytes if the session needs a changed graph).
        ``device_id``: the GPU CUDA runs on (a torchrun rank's local rank)."""
        import onnxruntime as ort

        self.info, model, data = inspected or inspect(path, logits_output)
        self.info.hidden = list(hidden or [])
        modified = bool(self.info.hidden) or topk_in_graph is not None
        if modified and model is None:
            model = parse_model(Path(self.info.path), data)
        if self.info.hidden:
            add_outputs(model, self.info.hidden)
        self.topk_in_graph = topk_in_graph is not None
        if topk_in_graph is not None:
            add_topk_head(model, self.info.logits_output, *topk_in_graph)
        if self.topk_in_graph:
            self._outputs = [TOPK_IDS, TOPK_LOGP, TOPK_LOGZ] + self.info.hidden
        else:
            self._outputs = [self.info.logits_output] + self.info.hidden

        available = ort.get_available_providers()
        if device == "cpu":
            wanted = [_CPU]
        elif device == "cuda":
            if CUDA_PROVIDER not in available:
                raise TeacherError(
                    f"--device cuda: this onnxruntime build has no CUDA provider (available: {available}). "
                    "Install onnxruntime-gpu, or use --device auto/cpu."
                )
            wanted = [CUDA_PROVIDER, _CPU]
        else:
            wanted = [p for p in (CUDA_PROVIDER, _CPU) if p in available]
        wanted = [(p, {"device_id": device_id}) if p == CUDA_PROVIDER else p for p in wanted]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ORT's idle workers spin after each run by default, on the cores the host kernel needs next: without the
        # spin the kernel took 0.67x the time and the teacher's own runs no longer (V = 50,257, 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # its errors reach the user through the exception each raises, once
        # The session is built from bytes (the graph we hashed, or its modified copy), so ORT cannot know where
        # the model lives; external-data locations are relative to the model's folder, whatever the cwd.
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(Path(self.info.path).resolve().parent)
        )
        # A CUDA provider that fails to load is logged by ORT as an error before it falls back; we read back
        # get_providers() and say what ran ourselves, so keep that noise off the user's terminal.
        ort.set_default_logger_severity(4)
        source = model.SerializeToString() if modified else data
        model = None  # a parsed graph alive while ORT builds the session slows that down (2x at 1.2 GB)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=wanted)
        except Exception as exc:  # ORT raises its own exception types from the C++ side
            raise TeacherError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.providers = self.session.get_providers()
        if device == "cuda" and CUDA_PROVIDER not in self.providers:
            raise TeacherError(
                "--device cuda: ONNX Runtime could not load CUDA (drivers, CUDA or cuDNN libraries missing) and fell "
                f"back to {self.providers}. Fix the CUDA install or use --device cpu."
            )
        self.provider = self.providers[0]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.info.inputs]

    def run(self, feeds: dict[str, np.ndarray], dense_logits: bool = False) -> list[np.ndarray]:
        """The session's outputs in the order the class docstring gives; with ``dense_logits`` the full logits
        come last, from the same run."""
        names = self._outputs + ([self.info.logits_output] if dense_logits and self.topk_in_graph else [])
        try:
            return self.session.run(names, feeds)
        except Exception as exc:  # ORT's shape/type failures; name the teacher and the inputs
            shapes = {k: (v.shape, str(v.dtype)) for k, v in feeds.items()}
            text = str(exc).strip()
            if "input_ids" in feeds and "out of" in text and "bound" in text:  # Gather past the embedding table
                text += (
                    f" (the largest token id in this batch is {int(feeds['input_ids'].max())}: token ids must be "
                    "below the teacher's vocabulary size; was the data tokenised with the teacher's tokenizer?)"
                )
            raise TeacherError(f"teacher failed on inputs {shapes}: {text}") from exc
