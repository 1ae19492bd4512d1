"""Build a student from a spec string: a built-in family of ``stages.student_models`` or your own builder.

Every student follows the protocol of ``stages.student_models``: ``forward(inputs: dict[str, Tensor]) ->
StudentOutput`` and ``num_layers``.

Spec syntax (``parse_student_spec``):

- ``family`` or ``family:key=value,key=value`` for a built-in family (``mlp``, ``cnn1d``, ``transformer``,
  ``causal-lm``). Lists are written with ``x``: ``mlp:hidden=256x256,dropout=0.1``; booleans as true/false.
- Anything else before the first ``:`` names your own builder: ``package.module:function`` or
  ``path/to/file.py:function``, with options after a ``?``: ``my_students:make?width=64,depth=2``. Options of
  your own builder are read as int, float, true/false, an ``x`` list of ints, or else a string.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stages.errors import ConfigError
from stages.hf_students import is_hf_spec
from stages.student_models import (
    CausalLMOptions,
    CausalLMStudent,
    CNN1dOptions,
    CNN1dStudent,
    MLPOptions,
    MLPStudent,
    StudentOutput,
    TransformerOptions,
    TransformerStudent,
)

_FAMILIES: dict[str, type] = {
    "mlp": MLPOptions,
    "cnn1d": CNN1dOptions,
    "transformer": TransformerOptions,
    "causal-lm": CausalLMOptions,
}


def parse_student_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into its family (or ``module:function`` target) and its parsed options.

    ``"mlp:hidden=256x256,dropout=0.1"`` -> ``("mlp", {"hidden": [256, 256], "dropout": 0.1})``;
    ``"pkg.mod:make?width=64"`` -> ``("pkg.mod:make", {"width": 64})``. Only options written in the spec are
    returned; defaults are filled in by ``build_student``.
    """
    head, colon, rest = spec.strip().partition(":")
    if head in _FAMILIES:
        return head, _typed_options(head, _split_options(rest, spec))
    if not colon:
        raise ConfigError(
            f"unknown student family {head!r}; valid families: {', '.join(_FAMILIES)} "
            "(or 'module:function' / 'path/to/file.py:function' for your own)"
        )
    target, _, raw = spec.strip().partition("?")
    module, _, function = target.rpartition(":")
    if not module or not function.isidentifier():
        raise ConfigError(f"student spec {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    return target, {key: _guess_value(value) for key, value in _split_options(raw, spec).items()}


def build_student(
    spec: str,
    *,
    num_outputs: int,
    input_dim: int | dict[str, int | tuple[int, ...]] | None = None,
    vocab_size: int | None = None,
    options: dict[str, Any] | None = None,
    wider_outputs: bool = False,
) -> nn.Module:
    """Build the student a spec names.

    num_outputs: classes for classifiers; the (possibly padded) vocabulary for a causal LM.
    input_dim: the float vector input(s) of ``mlp``, ``cnn1d`` and vector builders: ``{column: F_i}`` or
        ``{column: per-example shape}`` for nested columns (the student reads ``inputs[column]`` [B, *shape] for
        each, flattened, and concatenates them in this order), or an int F for one input ``x``.
    vocab_size: token ids are < vocab_size; needed by ``transformer``, optional for ``causal-lm`` (<= num_outputs).
    options: overrides in dict form, e.g. from a config file; a key given here and in the spec is an error.
    wider_outputs: accept a builder whose logits are wider than num_outputs (a padded vocabulary that the trainer
        truncates with --truncate-vocab); otherwise the width must equal num_outputs.
    """
    family, spec_options = parse_student_spec(spec)
    extra = dict(options or {})
    both = sorted(set(spec_options) & set(extra))
    if both:
        raise ConfigError(f"student option(s) {both} given both in spec {spec!r} and in options; give each once")
    shapes = {
        name: (size,) if isinstance(size, int) else tuple(size)
        for name, size in ({"x": input_dim} if isinstance(input_dim, int) else input_dim or {}).items()
    }
    dims = {name: math.prod(shape) for name, shape in shapes.items()}
    if family in _FAMILIES:
        built_options = _FAMILIES[family](**spec_options, **_typed_options(family, extra))
        _check_ranges(family, built_options)
        return _build_builtin(family, built_options, num_outputs, dims, vocab_size)
    sizes = {"input_dim": sum(dims.values()) if dims else None, "vocab_size": vocab_size}
    kwargs = {"num_outputs": num_outputs, **{k: v for k, v in sizes.items() if v is not None}, **spec_options, **extra}
    return _build_custom(family, kwargs, num_outputs, shapes, vocab_size, wider_outputs)


# What each kind of student reads and predicts: the data it fits, checked by ``check_family_fits``. A kind
# missing here says so itself: an ``hf:`` model's config names its task, your own builder gets its sizes.
VECTOR, SEQUENCE, TOKEN = "vector", "sequence", "token"
_FITS = {"mlp": VECTOR, "cnn1d": VECTOR, "transformer": SEQUENCE, "causal-lm": TOKEN}
_DATA = {
    VECTOR: "float vectors with one target per example",
    SEQUENCE: "token ids with one target per sequence",
    TOKEN: "token ids with one target per token (a language model)",
}
_USE = {VECTOR: "mlp or cnn1d", SEQUENCE: "transformer (sequence classifier)", TOKEN: "causal-lm"}


def student_kind(spec: str) -> str:
    """The kind of student a spec names: a built-in family, "hf" for ``hf:DIR``, or your ``module:function``."""
    return "hf" if is_hf_spec(spec) else parse_student_spec(spec)[0]


def check_family_fits(spec: str, data: str, columns: list[str]) -> None:
    """Refuse a student that cannot read this data, naming the family that can.

    data: VECTOR, SEQUENCE or TOKEN (what the dataset's inputs and the cache's kind make it); columns: the
    dataset's input columns, for the message. Kinds that decide for themselves (``_FITS``) pass.
    """
    family = student_kind(spec)
    if _FITS.get(family, data) == data:
        return
    raise ConfigError(
        f"student {family!r} reads {_DATA[_FITS[family]]}; this run has {_DATA[data]} "
        f"in column(s) {', '.join(columns)}: use {_USE[data]}"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; tied weights (the causal LM's embedding and head) count once."""
    return sum(p.numel() for p in model.parameters())


# ---- option parsing -------------------------------------------------------------------------------------------


def _split_options(raw: str, spec: str) -> dict[str, str]:
    """``"a=1,b=2x3"`` -> ``{"a": "1", "b": "2x3"}``; an empty string gives no options."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"student option {item!r} in {spec!r} is not key=value, e.g. 'hidden=256x256'")
        if key.strip() in result:
            raise ConfigError(f"student option {key.strip()!r} appears twice in {spec!r}; give it once")
        result[key.strip()] = value.strip()
    return result


def _typed_options(family: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Check option names against the family's options dataclass and convert each value to its field's type."""
    kinds = typing.get_type_hints(_FAMILIES[family])
    problems, parsed = [], {}
    for key, value in raw.items():
        if key not in kinds:
            problems.append(f"unknown option {key!r} for student family {family!r}; valid options: {', '.join(kinds)}")
            continue
        try:
            parsed[key] = _convert(value, kinds[key])
        except ValueError:
            problems.append(f"student option {key}={value!r} for {family!r} is not {_describe(kinds[key])}")
    if problems:
        raise ConfigError("; ".join(problems))
    return parsed


def _convert(value: Any, kind: Any) -> Any:
    """Convert a spec string (or an already-typed value from a dict) to ``kind``; ValueError if it does not fit."""
    if typing.get_origin(kind) is types.UnionType:  # `int | None`: None stays, anything else must be an int
        if value is None:
            return None
        kind = int
    if kind is bool:
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return value if isinstance(value, bool) else str(value).lower() == "true"
        raise ValueError(value)
    if kind is int or kind is float:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError(value)
        return kind(value)
    items = value.split("x") if isinstance(value, str) else value  # list[int], written 256x256
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(value)
    return [_convert(item, int) for item in items]


def _describe(kind: Any) -> str:
    if kind == list[int]:
        return "a list of integers like 256x256"
    return {bool: "true or false", float: "a number"}.get(kind, "an integer")


def _check_ranges(family: str, options: Any) -> None:
    """Reject option values of the right type that still make no model; every integer option must be >= 1."""
    problems = []
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name == "dropout" and not 0.0 <= value < 1.0:
            problems.append(f"student option dropout={value} for {family!r} must be in [0, 1)")
        elif (isinstance(value, list) and min(value) < 1) or (type(value) is int and value < 1):
            problems.append(f"student option {f.name}={value} for {family!r} must be at least 1")
    d_model, heads = getattr(options, "d_model", 1), getattr(options, "heads", 1)
    if heads >= 1 and d_model % heads:
        problems.append(f"student d_model={d_model} is not divisible by heads={heads}; pick heads that divide it")
    if problems:
        raise ConfigError("; ".join(problems))


def _guess_value(value: str) -> Any:
    """Type a ``module:function`` option with no schema: int, float, true/false, ``NxM`` ints, else the string."""
    for kind in (int, float, bool, list[int]):
        try:
            return _convert(value, kind)
        except ValueError:
            continue
    return value


# ---- built-in families ----------------------------------------------------------------------------------------


def _build_builtin(
    family: str, options: Any, num_outputs: int, input_dims: dict[str, int] | None, vocab_size: int | None
) -> nn.Module:
    if num_outputs < 1:
        raise ConfigError(f"num_outputs={num_outputs} for student {family!r}; it must be at least 1")
    if family in ("mlp", "cnn1d"):
        if not input_dims or min(input_dims.values()) < 1:
            raise ConfigError(
                f"student {family!r} needs float vector inputs of >= 1 feature each "
                f"(input_dim={{column: features}}); got {input_dims}"
            )
        cls = MLPStudent if family == "mlp" else CNN1dStudent
        return cls(input_dims, num_outputs, options)
    if family == "transformer":
        if vocab_size is None or vocab_size < 1:
            raise ConfigError(f"student 'transformer' needs vocab_size >= 1 (the tokenizer's); got {vocab_size}")
        return TransformerStudent(vocab_size, num_outputs, options)
    if vocab_size is not None and vocab_size > num_outputs:
        raise ConfigError(
            f"causal-lm vocab_size={vocab_size} exceeds num_outputs={num_outputs}; num_outputs is the LM's "
            "vocabulary and must cover every token id"
        )
    return CausalLMStudent(num_outputs, options)


def _build_custom(
    target: str,
    kwargs: dict[str, Any],
    num_outputs: int,
    input_shapes: dict[str, tuple[int, ...]],
    vocab_size: int | None,
    wider_outputs: bool,
) -> nn.Module:
    """Import the builder, call it, and check once on a tiny batch that the module keeps the student protocol."""
    builder = _import_builder(target)
    parameters = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if input_shapes and vocab_size is None and ("input_names" in parameters or takes_any):
        kwargs["input_names"] = list(input_shapes)  # optional: only builders that ask for the column names get them
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"student builder {target!r} cannot take arguments {sorted(kwargs)}: {exc}") from exc
    try:
        model = builder(**kwargs)
    except Exception as exc:  # the user's code: name it, not us
        raise ConfigError(f"student builder {target!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"student builder {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"student builder {target!r} returned a module with no trainable parameters")
    device = next(model.parameters(), torch.empty(0)).device
    if vocab_size is not None:
        ids = torch.zeros(2, 4, dtype=torch.long, device=device)
        probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif input_shapes:  # each input as the loader gives it: [B, F_i], or [B, *shape] for nested columns
        probe = {name: torch.zeros(2, *shape, device=device) for name, shape in input_shapes.items()}
    else:
        raise ConfigError(f"student {target!r} needs input_dim (vector inputs) or vocab_size (token inputs)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = model(probe)
    except Exception as exc:  # the user's code: any failure means it does not keep the protocol
        probe_shapes = ", ".join(f"{k}: {list(v.shape)}" for k, v in probe.items())
        raise ConfigError(
            f"student {target!r} failed on a probe batch {{name: tensor}} = {{{probe_shapes}}}: "
            f"{type(exc).__name__}: {exc}. "
            "A student's forward takes a dict of input tensors named like the dataset's columns."
        ) from exc
    model.train(was_training)
    out = _as_output(raw, target)
    width = out.logits.shape[-1]
    rank_ok = out.logits.dim() == 2 or (vocab_size is not None and out.logits.dim() == 3)  # vectors: [B, C]
    if not rank_ok or out.logits.shape[0] != 2 or not (width == num_outputs or (wider_outputs and width > num_outputs)):
        wider = (
            " (a padded vocabulary: pass --truncate-vocab to train on its first logits)" if width > num_outputs else ""
        )
        raise ConfigError(
            f"student {target!r} returned logits of shape {tuple(out.logits.shape)} for a batch of 2; expected "
            f"[2, {num_outputs}]{'' if vocab_size is None else f' or [2, S, {num_outputs}]'} (num_outputs last)"
            f"{wider}"
        )
    num_layers = getattr(model, "num_layers", len(out.hidden))
    if num_layers != len(out.hidden):
        raise ConfigError(
            f"student {target!r} has num_layers={num_layers} but returned {len(out.hidden)} hidden tensors"
        )
    if isinstance(raw, StudentOutput):
        model.num_layers = num_layers
        return model
    return _AdaptedStudent(model, num_layers, target)


def _import_builder(target: str) -> Callable[..., Any]:
    """``pkg.mod:function`` via importlib, or ``path/to/file.py:function`` loaded from that file."""
    module_name, _, function = target.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"student builder file {path} (from {target!r}) does not exist")
            file_spec = importlib.util.spec_from_file_location(f"_student_{path.stem}", path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import student module {module_name!r} (from {target!r}): {exc}") from exc
    except ConfigError:
        raise
    except Exception as exc:  # the module's own code failed while it was imported
        raise ConfigError(
            f"student module {module_name!r} (from {target!r}) raised {type(exc).__name__} while importing: {exc}"
        ) from exc
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ConfigError(f"student module {module_name!r} has no function {function!r}")
    return builder


def _as_output(out: Any, target: str) -> StudentOutput:
    """Accept StudentOutput, a (logits, hidden) pair, or bare logits (hidden = []); anything else is an error."""
    if isinstance(out, StudentOutput):
        return out
    if isinstance(out, Tensor):
        return StudentOutput(out, [])
    if (
        isinstance(out, (tuple, list))
        and len(out) == 2
        and isinstance(out[0], Tensor)
        and isinstance(out[1], (tuple, list))
        and all(isinstance(h, Tensor) for h in out[1])
    ):
        return StudentOutput(out[0], list(out[1]))
    raise ConfigError(
        f"student {target!r} returned {type(out).__name__}; forward must return StudentOutput, "
        "a (logits, hidden list) tuple, or a logits Tensor"
    )


class _AdaptedStudent(nn.Module):
    """Wraps a builder's module whose forward returns a tuple or bare logits so that it returns StudentOutput.

    Its parameters appear under ``model.`` in the state dict.
    """

    def __init__(self, model: nn.Module, num_layers: int, target: str):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.target = target

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        return _as_output(self.model(inputs), self.target)
