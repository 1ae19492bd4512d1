"""Student families, the spec parser, your-own-builder specs, and the ONNX export check."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from stages import export
from stages.errors import ConfigError, PipelineError
from stages.export import export_onnx
from stages.students import (
    SEQUENCE,
    TOKEN,
    VECTOR,
    StudentOutput,
    build_student,
    check_family_fits,
    count_parameters,
    parse_student_spec,
    student_kind,
)

B, F, S, V = 3, 40, 7, 50  # batch, features, sequence length, token vocabulary

TINY = {
    "mlp": ("mlp:hidden=16x8", {"num_outputs": 10, "input_dim": F}),
    "cnn1d": ("cnn1d:channels=4x4x4", {"num_outputs": 10, "input_dim": F}),
    "transformer": ("transformer:layers=2,d_model=32,heads=2,max_len=16", {"num_outputs": 4, "vocab_size": V}),
    "causal-lm": ("causal-lm:layers=2,d_model=32,heads=2,max_len=16", {"num_outputs": 64, "vocab_size": V}),
}


def _inputs(family: str, batch: int = B, seq: int = S) -> dict[str, torch.Tensor]:
    if family in ("mlp", "cnn1d"):
        return {"x": torch.randn(batch, F)}
    ids = torch.randint(0, V, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _tiny(family: str) -> torch.nn.Module:
    spec, sizes = TINY[family]
    torch.manual_seed(0)
    return build_student(spec, **sizes).eval()


# ---- families ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, logits_shape, hidden_shapes",
    [
        ("mlp", (B, 10), [(B, 16), (B, 8)]),
        ("cnn1d", (B, 10), [(B, 4 * 20), (B, 4 * 10), (B, 4 * 5)]),  # stride 2: 40 -> 20 -> 10 -> 5
        ("transformer", (B, 4), [(B, S, 32)] * 2),
        ("causal-lm", (B, S, 64), [(B, S, 32)] * 2),
    ],
)
def test_forward_shapes(family, logits_shape, hidden_shapes):
    model = _tiny(family)
    out = model(_inputs(family))
    assert isinstance(out, StudentOutput)
    assert tuple(out.logits.shape) == logits_shape
    assert model.num_layers == len(out.hidden)
    assert [tuple(h.shape) for h in out.hidden] == hidden_shapes


def test_defaults_are_the_documented_ones():
    mlp = build_student("mlp", num_outputs=10, input_dim=F)
    assert mlp.num_layers == 2
    assert count_parameters(mlp) == (F * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
    assert build_student("cnn1d", num_outputs=10, input_dim=F).num_layers == 3
    assert build_student("transformer", num_outputs=2, vocab_size=V).num_layers == 2


def test_causal_lm_ties_embeddings_and_counts_them_once():
    tied = build_student("causal-lm:d_model=32,heads=2", num_outputs=64)
    untied = build_student("causal-lm:d_model=32,heads=2,tie=false", num_outputs=64)
    assert tied.head.weight is tied.trunk.tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == 64 * 32


def test_causal_lm_is_causal():
    model = _tiny("causal-lm")
    ids = torch.randint(0, V, (2, S))
    changed = ids.clone()
    changed[:, 4] = (ids[:, 4] + 1) % V
    before, after = model({"input_ids": ids}).logits, model({"input_ids": changed}).logits
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_the_transformer_classifier(side):
    model = _tiny("transformer")
    ids = torch.randint(1, V, (1, 5))
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1)
    mask = (torch.arange(8) < 5) if side == "right" else (torch.arange(8) >= 3)
    plain = model({"input_ids": ids}).logits
    masked = model({"input_ids": padded, "attention_mask": mask.long().unsqueeze(0)}).logits
    torch.testing.assert_close(plain, masked, atol=1e-5, rtol=1e-5)


def test_all_padding_row_stays_finite():
    model = _tiny("transformer")
    out = model(
        {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}
    )
    assert torch.isfinite(out.logits).all()


# ---- spec parsing -----------------------------------------------------------------------------------------------


def test_parse_spec_options():
    assert parse_student_spec("mlp") == ("mlp", {})
    assert parse_student_spec("mlp:hidden=256x256,dropout=0.1") == ("mlp", {"hidden": [256, 256], "dropout": 0.1})
    assert parse_student_spec("causal-lm:layers=4,d_model=256,tie=false") == (
        "causal-lm",
        {"layers": 4, "d_model": 256, "tie": False},
    )
    assert parse_student_spec("pkg.mod:make?width=8,act=gelu,sizes=2x3") == (
        "pkg.mod:make",
        {"width": 8, "act": "gelu", "sizes": [2, 3]},
    )


@pytest.mark.parametrize(
    "spec, words",
    [
        ("resnet", ["'resnet'", "mlp, cnn1d, transformer, causal-lm"]),
        ("mlp:width=3", ["'width'", "hidden, dropout"]),
        ("mlp:hidden=big", ["hidden='big'", "256x256"]),
        ("cnn1d:kernel=0", ["kernel=0", "at least 1"]),
        ("transformer:d_model=30,heads=4", ["d_model=30", "heads=4"]),
        ("mlp:dropout", ["'dropout'", "key=value"]),
    ],
)
def test_bad_specs_name_the_bad_value(spec, words):
    with pytest.raises(ConfigError) as info:
        build_student(spec, num_outputs=2, input_dim=F, vocab_size=V)
    for word in words:
        assert word in str(info.value)


def test_family_fit_is_checked_per_kind_of_student():
    """Built-in families are held to the data they read; hf: models and your own builders decide for themselves."""
    assert [student_kind(s) for s in ("mlp", "causal-lm:layers=1", "hf:data/hf students/mini", "pkg.mod:make")] == [
        "mlp",
        "causal-lm",
        "hf",
        "pkg.mod:make",
    ]
    for data in (VECTOR, SEQUENCE, TOKEN):
        check_family_fits("hf:data/hf students/mini?task=causal-lm", data, ["input_ids"])  # not a module:function
        check_family_fits("pkg.mod:make", data, ["x"])
    check_family_fits("causal-lm", TOKEN, ["input_ids"])
    with pytest.raises(ConfigError, match="student 'mlp' reads float vectors .* use causal-lm"):
        check_family_fits("mlp", TOKEN, ["input_ids"])


def test_options_dict_merges_with_spec_and_rejects_duplicates():
    model = build_student("mlp:hidden=8", num_outputs=2, input_dim=F, options={"dropout": 0.2})
    assert model.dropout.p == 0.2 and model.num_layers == 1
    with pytest.raises(ConfigError, match="hidden"):
        build_student("mlp:hidden=8", num_outputs=2, input_dim=F, options={"hidden": [4]})
    with pytest.raises(ConfigError, match="vocab_size"):
        build_student("transformer", num_outputs=2)


# ---- module:function --------------------------------------------------------------------------------------------

CUSTOM = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Pair(nn.Module):
        def __init__(self, input_dim, num_outputs, width):
            super().__init__()
            self.body = nn.Linear(input_dim, width)
            self.head = nn.Linear(width, num_outputs)

        def forward(self, inputs):
            h = torch.relu(self.body(inputs["x"]))
            return self.head(h), [h]

    class Bare(Pair):
        def forward(self, inputs):
            return super().forward(inputs)[0]

    class Wrong(Pair):
        def forward(self, inputs):
            return {"logits": super().forward(inputs)[0]}

    def pair(num_outputs, input_dim, width=4):
        return Pair(input_dim, num_outputs, width)

    def bare(num_outputs, input_dim):
        return Bare(input_dim, num_outputs, 4)

    def wrong(num_outputs, input_dim):
        return Wrong(input_dim, num_outputs, 4)

    def not_a_module(num_outputs, input_dim):
        return "mlp"
    """
)


@pytest.fixture
def custom_module(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "my_students.py"
    path.write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_module_function_spec_builds_and_adapts(custom_module):
    model = build_student("my_students:pair?width=6", num_outputs=3, input_dim=F)
    out = model({"x": torch.randn(B, F)})
    assert isinstance(out, StudentOutput)
    assert out.logits.shape == (B, 3) and model.num_layers == 1 and out.hidden[0].shape == (B, 6)

    bare = build_student(f"{custom_module}:bare", num_outputs=3, input_dim=F)  # the file-path form
    assert bare({"x": torch.randn(B, F)}).hidden == [] and bare.num_layers == 0


@pytest.mark.parametrize(
    "spec, words",
    [
        ("my_students:wrong", ["dict", "StudentOutput"]),
        ("my_students:not_a_module", ["str", "nn.Module"]),
        ("my_students:missing", ["'missing'"]),
        ("my_students:pair?depth=2", ["depth"]),
        ("no_such_module_xyz:make", ["'no_such_module_xyz'"]),
    ],
)
def test_bad_module_function_specs(custom_module, spec, words):
    with pytest.raises(ConfigError) as info:
        build_student(spec, num_outputs=3, input_dim=F)
    for word in words:
        assert word in str(info.value)


# ---- ONNX export ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(TINY))
def test_export_matches_torch_with_dynamic_batch(family, tmp_path):
    model = _tiny(family).train()
    # A batch of 1 for the vector models: the exporter must still leave the batch axis dynamic.
    example = _inputs(family, batch=1 if family in ("mlp", "cnn1d") else 2, seq=6)
    path = tmp_path / "student.onnx"
    diff = export_onnx(model, example, path)
    assert diff <= 1e-3
    assert model.training  # mode restored
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"]  # one file, no .data, no temp

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(example)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    other = _inputs(family, batch=5, seq=9)
    (got,) = session.run(["logits"], {k: v.numpy() for k, v in other.items()})
    with torch.no_grad():
        expected = model.eval()(other).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_failed_check_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # every difference, even 0, now fails
    with pytest.raises(PipelineError, match="disagrees"):
        export_onnx(_tiny("mlp"), _inputs("mlp"), tmp_path / "student.onnx")
    assert list(tmp_path.iterdir()) == []
