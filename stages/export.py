"""Export a trained student to one self-contained ONNX file that returns its logits, and check it against torch.

The graph's inputs are the example dict's keys in order. Axis 0 of every input is the dynamic ``batch``; axis 1
of integer inputs with two or more axes (``input_ids``, ``attention_mask``) is the dynamic ``seq``. The one
output is ``logits``. The check runs the file in ONNX Runtime (CPU) on the example batch and on one with a
different batch size (and a shorter sequence when there is one), against the model in eval mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from stages.errors import ConfigError, PipelineError

# Largest allowed |onnx - torch| on the logits, as a fraction of max(1, max |torch logits|).
ONNX_TOLERANCE = 1e-3


class _LogitsOnly(nn.Module):
    """Positional tensors in the example dict's key order -> the student's logits, the graph's one output."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(dict(zip(self.names, tensors))).logits


def export_onnx(model: nn.Module, example_inputs: dict[str, Tensor], path: Path) -> float:
    """Write ``model`` to ``path`` as ONNX, check it in ONNX Runtime, and return the max |onnx - torch| logit.

    example_inputs: e.g. {"x": float32 [B, F]} or {"input_ids": int64 [B, S], "attention_mask": int64 [B, S]};
    a batch (or sequence) shorter than 2 is repeated to 2 so that the axis stays dynamic. The file is written to a
    temporary name in the same directory and renamed only after the check passes, so a failed export writes
    nothing at ``path`` (an older file there stays as it was) and leaves no temporary file. The model and the
    inputs must be on one device; the comparison runs ONNX Runtime on CPU. Raises PipelineError when the export
    fails or the difference exceeds ONNX_TOLERANCE.
    """
    if not example_inputs:
        raise ConfigError("export_onnx needs at least one example input, e.g. {'x': tensor [B, F]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = {name: _at_least_two(t, _dynamic_axes(t)) for name, t in example_inputs.items()}
    was_training = model.training
    wrapper = _LogitsOnly(model, list(inputs)).eval()  # eval() reaches the student too: no dropout in the graph
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    sidecar = tmp.with_name(tmp.name + ".data")  # where the exporter would put external weights
    try:
        _export(wrapper, inputs, tmp)
        if sidecar.exists():
            raise PipelineError(
                f"the student's ONNX graph for {path} needs external weight data (over the 2 GB protobuf limit); "
                "a single-file export needs a smaller student"
            )
        session = _session(tmp)
        diff = max(_compare(model, session, batch) for batch in (inputs, _other_shape(inputs)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        model.train(was_training)
    return diff


def _dynamic_axes(t: Tensor) -> dict[int, str]:
    """Axis 0 is the batch; axis 1 of an integer tensor with >= 2 axes is the token sequence."""
    axes = {0: "batch"}
    if t.dim() >= 2 and not t.is_floating_point():
        axes[1] = "seq"
    return axes


def _at_least_two(t: Tensor, axes: dict[int, str]) -> Tensor:
    """Repeat the tensor along each dynamic axis of size 1: the exporter fixes axes of size 1 to 1."""
    for axis in axes:
        if t.shape[axis] < 2:
            t = torch.cat([t, t], dim=axis)
    return t


def _other_shape(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """One more row (a copy of row 0), and one token fewer when sequences are longer than 2."""
    out = {}
    for name, t in inputs.items():
        t = torch.cat([t, t[:1]], dim=0)
        if 1 in _dynamic_axes(t) and t.shape[1] > 2:
            t = t[:, :-1]
        out[name] = t
    return out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known noise (torchvision-missing log lines, internal deprecation and renaming
    warnings) for the duration of one export; real failures still raise."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name")
            yield
    finally:
        onnx_logger.setLevel(level)


def _export(wrapper: nn.Module, inputs: dict[str, Tensor], tmp: Path) -> None:
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    dims = {"batch": batch, "seq": seq}
    dynamic_shapes = tuple({axis: dims[name] for axis, name in _dynamic_axes(t).items()} for t in inputs.values())
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                wrapper,
                tuple(inputs.values()),
                tmp,
                dynamo=True,
                external_data=False,
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_shapes=(dynamic_shapes,),  # one entry: the wrapper's *tensors
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many internal types; the CLI needs one named error
        raise PipelineError(f"ONNX export of the student failed: {type(exc).__name__}: {exc}") from exc


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(model: nn.Module, session: ort.InferenceSession, inputs: dict[str, Tensor]) -> float:
    """Max |onnx - torch| on one batch; PipelineError when it exceeds the tolerance."""
    with torch.no_grad():
        expected = model(inputs).logits.float().cpu().numpy()
    feed = {i.name: inputs[i.name].cpu().numpy() for i in session.get_inputs()}
    (got,) = session.run(["logits"], feed)
    if got.shape != expected.shape:
        raise PipelineError(f"ONNX student returned logits {got.shape}, torch {expected.shape}, for the same inputs")
    diff = float(np.abs(got - expected).max())
    limit = ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if not diff <= limit:  # also catches NaN
        raise PipelineError(
            f"ONNX student disagrees with torch: max |logit difference| {diff:.3g} > {limit:.3g} "
            f"(tolerance {ONNX_TOLERANCE} x max(1, max |logit|)) on input shapes "
            f"{ {k: tuple(v.shape) for k, v in inputs.items()} }"
        )
    return diff
