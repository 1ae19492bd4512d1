"""Small real ONNX teachers and datasets built in tests, with numpy references of their forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

IR_VERSION = 8  # old enough for every onnxruntime this project supports
OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def save_with_external_data(src: Path, dst: Path, locations: dict[str, str]) -> Path:
    """Re-save model ``src`` as ``dst`` with initializer NAME's bytes in file ``locations[NAME]`` (relative to dst).

    Several tensors may share a file (they are appended); the rest stay inside the graph.
    """
    model = onnx.load(src)
    for init in model.graph.initializer:
        if init.name in locations:
            set_external_data(init, locations[init.name])  # onnx.save_model writes the bytes there
    for location in set(locations.values()):
        (dst.parent / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, dst)
    return dst


def classifier_weights(features: int, width: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 1 / np.sqrt(features), (features, width)).astype(np.float32),
        "w2": rng.normal(0, 3 / np.sqrt(width), (width, classes)).astype(np.float32),
    }


def make_classifier(
    path: Path,
    features: int = 8,
    width: int = 16,
    classes: int = 10,
    seed: int = 0,
    *,
    batch: str | int = "batch",
    logits_shape: list | None = None,
) -> dict:
    """x [B, F] -> relu(x @ w1) named 'hidden' -> @ w2 -> logits [B, C].

    ``batch``: a number fixes the batch axis, as an export without a dynamic batch axis does. ``logits_shape``:
    what the graph declares for its logits instead of [batch, classes]; of rank 3, the logits get an axis of 1
    in the middle ([B, 1, C], a classifier exported with a squeezable axis)."""
    w = classifier_weights(features, width, classes, seed)
    shape = logits_shape or [batch, classes]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["logits" if len(shape) == 2 else "flat"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    if len(shape) == 3:
        nodes.append(helper.make_node("Unsqueeze", ["flat", "middle"], ["logits"]))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "middle"))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
        inits,
    )
    _save(graph, path)
    return w


def classifier_forward(w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(x.astype(np.float32) @ w["w1"], 0)
    return hidden @ w["w2"], hidden


def make_token_teacher(path: Path, vocab: int = 50, dim: int = 8, seed: int = 0) -> dict:
    """input_ids [B, S], attention_mask [B, S] -> embeddings 'embed' [B, S, D] -> logits [B, S, V].

    Each position also sees the running mean of the (masked) previous embeddings, so padding would change the
    outputs if the mask were ignored: the round-trip test catches a pipeline that pads wrongly.
    """
    rng = np.random.default_rng(seed)
    w = {
        "emb": rng.normal(0, 1, (vocab, dim)).astype(np.float32),
        "head": rng.normal(0, 2 / np.sqrt(dim), (dim, vocab)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["embed"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["embed", "mask3"], ["masked"]),
        helper.make_node("CumSum", ["masked", "axis1"], ["csum"]),
        helper.make_node("CumSum", ["mask3", "axis1"], ["ccount"]),
        helper.make_node("Div", ["csum", "ccount"], ["ctx"]),
        helper.make_node("Add", ["embed", "ctx"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "head"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array(1, np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "token_teacher",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits,
    )
    _save(graph, path)
    return w


def token_forward(w: dict, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One unpadded sequence [S] -> logits [S, V], embeddings [S, D]."""
    embed = w["emb"][ids]
    ctx = np.cumsum(embed, 0) / np.arange(1, len(ids) + 1)[:, None]
    return (embed + ctx) @ w["head"], embed


def make_cached_decoder(path: Path, vocab: int = 50, heads: int = 2, head_dim: int = 4, seed: int = 0) -> dict:
    """A decoder as Hugging Face exports one with its key/value cache: input_ids, attention_mask, position_ids
    [B, S], past_key_values.0.key/value [batch, heads, past_sequence_length, head_dim], use_cache_branch [1] ->
    logits [B, S, V], present.0.key/value. The logits depend on the positions (a learnt position embedding), and
    shift by 100 if use_cache_branch is true and by 1000 per cached past position: a plain forward pass over the
    sequence needs positions 0.. and an empty cache with the branch off."""
    rng = np.random.default_rng(seed)
    dim = heads * head_dim
    w = {
        "emb": rng.normal(0, 1, (vocab, dim)).astype(np.float32),
        "pos_emb": rng.normal(0, 1, (64, dim)).astype(np.float32),
        "head": rng.normal(0, 2 / np.sqrt(dim), (dim, vocab)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["embed"]),
        helper.make_node("Gather", ["pos_emb", "position_ids"], ["pe"]),
        helper.make_node("Add", ["embed", "pe"], ["h"]),
        helper.make_node("Reshape", ["h", "split_heads"], ["h4"]),
        helper.make_node("Transpose", ["h4"], ["k_new"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "k_new"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "k_new"], ["present.0.value"], axis=2),
        helper.make_node("MatMul", ["h", "head"], ["plain"]),
        helper.make_node("Where", ["use_cache_branch", "hundred", "zero"], ["branch"]),
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]),
        helper.make_node("Gather", ["past_shape", "two"], ["past_len"]),
        helper.make_node("Cast", ["past_len"], ["past_lenf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["past_lenf", "thousand"], ["past_shift"]),
        helper.make_node("Add", ["plain", "branch"], ["with_branch"]),
        helper.make_node("Add", ["with_branch", "past_shift"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "split_heads"),
        numpy_helper.from_array(np.array([100.0], np.float32), "hundred"),
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(1000.0, np.float32), "thousand"),
    ]
    past = ["batch_size", heads, "past_sequence_length", head_dim]
    total = ["batch_size", heads, "total_sequence_length", head_dim]
    graph = helper.make_graph(
        nodes,
        "cached_decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past),
            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, past),
            helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, total),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, total),
        ],
        inits,
    )
    _save(graph, path)
    return w


def cached_decoder_forward(w: dict, ids: np.ndarray) -> np.ndarray:
    """One unpadded sequence [S] -> logits [S, V] of the plain forward pass (positions 0.., no cache)."""
    return (w["emb"][ids] + w["pos_emb"][np.arange(len(ids))]) @ w["head"]


def make_sequence_classifier(path: Path, vocab: int = 50, dim: int = 8, classes: int = 3, seed: int = 0) -> dict:
    """input_ids, attention_mask [B, S] -> masked mean of embeddings -> logits [B, C] (padding must be masked)."""
    rng = np.random.default_rng(seed)
    w = {
        "emb": rng.normal(0, 1, (vocab, dim)).astype(np.float32),
        "head": rng.normal(0, 1, (dim, classes)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["embed"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["embed", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence_classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    _save(graph, path)
    return w


def make_unmasked_pooler(path: Path, vocab: int = 50, dim: int = 8, classes: int = 4, seed: int = 0) -> dict:
    """input_ids [B, S] alone -> the mean of the embeddings over all S -> logits [B, C]. With no attention_mask
    input it cannot tell padding from tokens: a padded row's logits differ from the row run alone."""
    rng = np.random.default_rng(seed)
    w = {
        "emb": rng.normal(0, 1, (vocab, dim)).astype(np.float32),
        "head": rng.normal(0, 1, (dim, classes)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["embed"]),
            helper.make_node("ReduceMean", ["embed"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
        ],
        "unmasked_pooler",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    _save(graph, path)
    return w


def sequence_classifier_forward(w: dict, ids: np.ndarray) -> np.ndarray:
    """One unpadded sequence [S] -> logits [C]."""
    return w["emb"][ids].mean(0) @ w["head"]


def write_vectors(path: Path, x: np.ndarray, labels: np.ndarray | None = None, ids=None) -> Path:
    ids = np.arange(len(x)) if ids is None else ids
    columns = {"id": pa.array(ids), "x": pa.array(list(x.astype(np.float32)), type=pa.list_(pa.float32()))}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    pq.write_table(pa.table(columns), path, row_group_size=64)
    return path


def write_sequences(path: Path, seqs: list[np.ndarray], ids=None) -> Path:
    ids = np.arange(len(seqs)) if ids is None else ids
    table = pa.table(
        {"id": pa.array(ids), "input_ids": pa.array([s.tolist() for s in seqs], type=pa.list_(pa.int64()))}
    )
    pq.write_table(table, path, row_group_size=16)
    return path


def random_sequences(n: int, vocab: int, min_len: int = 2, max_len: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(min_len, max_len + 1)) for _ in range(n)]
