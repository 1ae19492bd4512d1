"""Build the bundled default: MNIST-1D as Parquet, two small CNN teachers as ONNX, and an unlabelled transfer set.

Everything is generated offline, seeded and single-threaded, so two runs with the same library versions on the
same CPU write byte-identical files (another CPU may round differently and train other teacher weights). Run from
the repository root: `python data/build_default.py` (needs the `data` extra); `--parts` rebuilds only some files.

    data/mnist1d/train.parquet, test.parquet       the benchmark split: 4000 / 1000 labelled rows
    data/mnist1d/teacher_cnn.onnx (+ .json card)   the main teacher (seed 0)
    data/mnist1d/teacher_cnn_seed1.onnx (+ .json)  the same CNN and recipe with seed 1: the ensemble's second teacher
    data/mnist1d/train_transfer/                   one dataset: 0-train.parquet (a link to ../train.parquet), then
                                                   1-transfer.parquet (fresh generator rows, label null)
"""

import argparse
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mnist1d.data import get_dataset_args, make_dataset  # never `get_dataset`: it downloads
from torch import nn

SEQ_LEN = 40  # MNIST-1D's final_seq_length
NUM_CLASSES = 10
BENCHMARK_SEED = 42  # get_dataset_args' default seed: the published benchmark split
TEST_ID_OFFSET = 1_000_000  # ids never collide across splits
TRANSFER_ID_OFFSET = 2_000_000
OPSET = 20  # pinned so the file does not change with torch's default; onnxruntime >= 1.17 runs it
HIDDEN = ("conv1", "conv2", "conv3", "features")  # tensor names users pass to `cache-teacher --hidden`
TEACHERS = {"teacher": ("teacher_cnn", 0), "teacher-seed1": ("teacher_cnn_seed1", 1)}  # part -> (file stem, seed)
# 30,000 rows (4 MB) lift the main job's KD student from 68% to 83% in ~10 CPU-seconds of training; BENCHMARKS.md's
# 50,000 rows and more epochs reach 88% with about three times the training and 7 MB.
TRANSFER_ROWS = 30_000
TRANSFER_SEED = 1  # any seed but the benchmark's 42
TRAIN_TRANSFER = "train_transfer"  # the combined dataset's directory: labelled rows first, then the transfer set
TRANSFER_ROW_GROUP = 4096  # Dataset.read decodes whole row groups: small ones keep the loader's reads small


def to_table(x: np.ndarray, labels: np.ndarray | None, id_offset: int) -> pa.Table:
    """Rows of 40 float32 values; `labels=None` gives an all-null label column (an unlabeled transfer set)."""
    n = len(x)
    offsets = pa.array(np.arange(0, (n + 1) * SEQ_LEN, SEQ_LEN, dtype=np.int32))
    values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64) + id_offset),
            "x": pa.ListArray.from_arrays(offsets, values),  # a plain list<float32>, not fixed_size_list
            "label": pa.nulls(n, pa.int64()) if labels is None else pa.array(labels, pa.int64()),
        }
    )


def make_transfer_set(num_samples: int, seed: int) -> pa.Table:
    """Fresh MNIST-1D draws from another seed, labels dropped, for distilling on data the teacher never saw."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seed == BENCHMARK_SEED:
        raise ValueError(f"seed {seed} is the benchmark's own seed: the transfer set would repeat the train set")
    args = get_dataset_args()
    args.num_samples = -(-num_samples // NUM_CLASSES) * NUM_CLASSES  # make_dataset draws num_samples // 10 per class
    args.seed = seed
    args.train_split = 1.0  # everything lands in "x"
    # make_dataset standardises with the mean/std of this draw, not of the benchmark; the difference is tiny.
    x = make_dataset(args)["x"][:num_samples]
    return to_table(x, None, TRANSFER_ID_OFFSET)


def to_tensors(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    x = table["x"].combine_chunks().flatten().to_numpy().reshape(-1, SEQ_LEN)
    return torch.from_numpy(x.copy()), torch.from_numpy(table["label"].to_numpy().copy())


class TeacherCNN(nn.Module):
    """Three stride-2 Conv1d+ReLU blocks (40 -> 20 -> 10 -> 5 positions), flatten, one Linear."""

    def __init__(self, channels: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2)
        self.conv3 = nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2)
        self.dropout = nn.Dropout(dropout)  # without it test accuracy stalls near 92%; gone in eval and in ONNX
        self.head = nn.Linear(channels * SEQ_LEN // 8, NUM_CLASSES)  # three stride-2 convs: 40 / 8 = 5 positions

    def hidden_states(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, 40] -> conv1 [B, C, 20], conv2 [B, C, 10], conv3 [B, C, 5], features [B, 5C]."""
        conv1 = torch.relu(self.conv1(x.unsqueeze(1)))
        conv2 = torch.relu(self.conv2(conv1))
        conv3 = torch.relu(self.conv3(conv2))
        return {"conv1": conv1, "conv2": conv2, "conv3": conv3, "features": conv3.flatten(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 40] -> logits [B, 10]."""
        return self.head(self.dropout(self.hidden_states(x)["features"]))


def train(
    x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch_size: int, lr: float, model_class=None
) -> nn.Module:
    """Adam, one-cycle schedule, seeded shuffle: the teachers' recipe (``model_class`` default TeacherCNN)."""
    torch.manual_seed(seed)  # weight init and dropout
    model = (model_class or TeacherCNN)()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=shuffle).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def export_onnx(model: TeacherCNN, example: torch.Tensor) -> onnx.ModelProto:
    """Export with a dynamic batch axis, then give the hidden activations the names in HIDDEN."""
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    proto = program.model_proto
    graph = proto.graph
    # The exporter names values after FX nodes (relu, relu_1, relu_2, view); find them by structure instead.
    relus = [node.output[0] for node in graph.node if node.op_type == "Relu"]
    heads = [node.input[0] for node in graph.node if node.op_type == "Gemm" and node.output[0] == "logits"]
    if len(relus) != 3 or len(heads) != 1:
        raise SystemExit(f"unexpected exported graph: Relu outputs {relus}, Gemm inputs {heads}")
    renames = dict(zip(relus + heads, HIDDEN))
    taken = {t.name for t in graph.initializer} | {out for node in graph.node for out in node.output} | {"x"}
    if clashes := (taken - renames.keys()) & set(HIDDEN):
        raise SystemExit(f"hidden names already used in the exported graph: {sorted(clashes)}")
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
        del node.metadata_props[:]  # stack traces with this machine's absolute paths
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_ort(proto: onnx.ModelProto, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """All graph outputs over x, in batches of batch_size, concatenated."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = [session.run(None, {"x": x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate(parts) for parts in zip(*batches)]


def verify(path: Path, model: TeacherCNN, x: torch.Tensor) -> dict[str, list[int | str]]:
    """Check the saved file against torch; return the hidden tensors' shapes. Raises SystemExit on a mismatch."""
    proto = onnx.load(str(path))
    with torch.no_grad():
        expected = {"logits": model(x), **model.hidden_states(x)}
    for batch_size in (7, len(x)):  # both unlike the export batch of 2: proves the batch axis is dynamic
        (logits,) = run_ort(proto, x.numpy(), batch_size)
        if (diff := np.abs(logits - expected["logits"].numpy()).max()) > 1e-4:
            raise SystemExit(f"ONNX logits differ from torch by {diff:.2e} at batch size {batch_size}")
    # Expose the hidden tensors the way `cache-teacher --hidden` does: as extra graph outputs of a copy.
    values = {v.name: v for v in proto.graph.value_info}
    if missing := [name for name in HIDDEN if name not in values]:
        raise SystemExit(f"hidden tensors missing from {path}: {missing}")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(values[name] for name in HIDDEN)
    outputs = run_ort(probe, x.numpy(), 7)
    for name, got in zip(HIDDEN, outputs[1:]):
        want = expected[name].numpy()
        if got.shape != want.shape or np.abs(got - want).max() > 1e-4:
            raise SystemExit(f"ONNX tensor {name!r} {got.shape} does not match torch {tuple(want.shape)}")
    return {name: [d.dim_param or d.dim_value for d in values[name].type.tensor_type.shape.dim] for name in HIDDEN}


def build_splits(out_dir: Path) -> None:
    data = make_dataset(get_dataset_args())  # the benchmark: 4000 train / 1000 test, seed 42
    train_rows, test_rows = to_table(data["x"], data["y"], 0), to_table(data["x_test"], data["y_test"], TEST_ID_OFFSET)
    pq.write_table(train_rows, out_dir / "train.parquet", compression="zstd")
    pq.write_table(test_rows, out_dir / "test.parquet", compression="zstd")


def build_teacher(out_dir: Path, name: str, seed: int, epochs: int, batch_size: int, lr: float) -> None:
    """Train the CNN with ``seed`` on train.parquet, export ``name``.onnx, check it, and write its card last."""
    # Train and test from the Parquet files, so the teacher sees exactly the bundled float32 values.
    x_train, y_train = to_tensors(pq.read_table(out_dir / "train.parquet"))
    x_test, y_test = to_tensors(pq.read_table(out_dir / "test.parquet"))
    model = train(x_train, y_train, seed, epochs, batch_size, lr)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).double().mean().item()
    print(f"{name} (seed {seed}) test accuracy: {accuracy:.4f}")
    if accuracy < 0.93:
        raise SystemExit(f"{name} test accuracy {accuracy:.4f} is below the 0.93 target")

    onnx_path = out_dir / f"{name}.onnx"
    # An example batch of 2 keeps clear of torch.export's 0/1 specialisation, which older torch applies to size 1.
    onnx.save(export_onnx(model, x_test[:2]), str(onnx_path))  # one self-contained file
    hidden_shapes = verify(onnx_path, model, x_test)

    card = {
        "architecture": "x [batch, 40] -> reshape [batch, 1, 40] -> 3 x (Conv1d k5 s2 p2, 32 channels, ReLU) "
        "-> flatten [batch, 160] -> Linear(160, 10) -> logits; Dropout(0.3) before Linear in training",
        "input": {"name": "x", "shape": ["batch", SEQ_LEN], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", NUM_CLASSES], "dtype": "float32"},
        "hidden": hidden_shapes,
        "opset": OPSET,
        "training": {
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "lr_schedule": f"OneCycleLR(max_lr={lr})",
            "data": "train.parquet",
        },
        "test_accuracy": round(accuracy, 6),
        "versions": {
            pkg: importlib.metadata.version(pkg)
            for pkg in ("torch", "onnx", "onnxscript", "onnxruntime-gpu", "pyarrow", "mnist1d", "numpy")
        },
        "sha256": {
            file: hashlib.sha256((out_dir / file).read_bytes()).hexdigest()
            for file in ("train.parquet", "test.parquet", onnx_path.name)
        },
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")  # last: written only on success


def write_transfer_rows(table: pa.Table, path: Path) -> None:
    """Random-looking floats barely compress: byte-stream-split encoding still saves ~10% over plain zstd."""
    pq.write_table(
        table,
        path,
        compression="zstd",
        use_dictionary=False,
        use_byte_stream_split=["x.list.element"],
        row_group_size=TRANSFER_ROW_GROUP,
    )


def build_train_transfer(out_dir: Path, rows: int, seed: int) -> None:
    """The labelled rows followed by the transfer set, as one dataset: one cache of it serves every student."""
    table = make_transfer_set(rows, seed)
    labelled = pq.read_schema(out_dir / "train.parquet")
    if not table.schema.equals(labelled):  # a dataset's files must share one schema
        raise SystemExit(f"transfer set schema {table.schema} differs from train.parquet's {labelled}")
    combined, staging = out_dir / TRAIN_TRANSFER, out_dir / (TRAIN_TRANSFER + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_transfer_rows(table, staging / "1-transfer.parquet")
    (staging / "0-train.parquet").symlink_to(Path("..") / "train.parquet")  # the same bytes, not a copy
    shutil.rmtree(combined, ignore_errors=True)
    staging.rename(combined)  # complete or absent
    print(f"wrote {rows} transfer rows (seed {seed}) after the labelled rows in {combined}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("data/mnist1d"), help="where the default is written")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("splits", *TEACHERS, "train-transfer"),
        default=("splits", *TEACHERS, "train-transfer"),
        help="what to (re)build, in this order (default: everything); teachers and the transfer set need the splits",
    )
    parser.add_argument("--epochs", type=int, default=30, help="teacher training epochs (~0.4 s each)")
    parser.add_argument("--batch-size", type=int, default=64, help="teacher training batch size")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate of the one-cycle schedule")
    parser.add_argument(
        "--transfer",
        type=int,
        metavar="N",
        help="write only an unlabeled transfer set of N fresh samples to --transfer-out, and build nothing else",
    )
    parser.add_argument("--transfer-seed", type=int, default=TRANSFER_SEED, help="generator seed of a transfer set")
    parser.add_argument("--transfer-out", type=Path, help="--transfer's path (default: OUT_DIR/transfer.parquet)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # with deterministic kernels: the same weights on every run
    torch.use_deterministic_algorithms(True)
    if args.transfer is not None:
        try:
            table = make_transfer_set(args.transfer, args.transfer_seed)
        except ValueError as error:
            parser.error(str(error))
        out = args.transfer_out or args.out_dir / "transfer.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out, compression="zstd")
        print(f"wrote {table.num_rows} transfer rows to {out}")
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if "splits" in args.parts:
        build_splits(args.out_dir)
    for part, (name, seed) in TEACHERS.items():
        if part in args.parts:
            build_teacher(args.out_dir, name, seed, args.epochs, args.batch_size, args.lr)
    if "train-transfer" in args.parts:
        try:
            build_train_transfer(args.out_dir, TRANSFER_ROWS, args.transfer_seed)
        except ValueError as error:
            parser.error(str(error))


if __name__ == "__main__":
    main()
