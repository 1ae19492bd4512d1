"""The built-in student models and their options. Built from a spec by ``stages.students.build_student``.

Every student is an ``nn.Module`` whose ``forward(inputs)`` takes a dict of tensors named like the dataset's
columns and returns a ``StudentOutput``; ``num_layers`` says how many entries ``hidden`` has.

- Vector classifiers (``mlp``, ``cnn1d``) read the float inputs they were built for, by the dataset column's
  name (``inputs["pixels"]`` [B, F], or [B, ...] flattened to [B, F]); several inputs are flattened and
  concatenated in the order given, F = the sum of their widths. They return logits [B, C].
- Token models (``transformer``, ``causal-lm``) read ``inputs["input_ids"]`` int64 [B, S] and an optional
  ``inputs["attention_mask"]`` int64 [B, S] (1 = real token, 0 = padding). The classifier returns [B, C], the
  causal LM [B, S, V].
- ``hidden[i]`` is the output of layer i: [B, D_i] for classifiers of vectors (conv maps flattened to
  [B, C*L]), [B, S, D_i] for token models, padded positions included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.errors import ConfigError


@dataclass
class StudentOutput:
    """What every student returns: logits [B, C] or [B, S, V], and one hidden tensor per layer."""

    logits: Tensor
    hidden: list[Tensor]


@dataclass
class MLPOptions:
    hidden: list[int] = field(default_factory=lambda: [100, 100])  # the MNIST-1D paper's MLP
    dropout: float = 0.0  # after each hidden activation; 0 = off


@dataclass
class CNN1dOptions:
    channels: list[int] = field(default_factory=lambda: [32, 32, 32])  # one stride-2 conv layer per entry
    kernel: int = 5  # conv kernel width; padding is kernel // 2


@dataclass
class TransformerOptions:
    layers: int = 2  # encoder blocks
    d_model: int = 128  # residual width
    heads: int = 4  # attention heads; must divide d_model
    ffn: int | None = None  # MLP width inside each block; None = 4 * d_model
    dropout: float = 0.1  # on embeddings, attention weights and residual branches
    max_len: int = 512  # longest sequence the learned positions cover


@dataclass
class CausalLMOptions:
    layers: int = 2  # decoder blocks
    d_model: int = 128  # residual width
    heads: int = 4  # attention heads; must divide d_model
    ffn: int | None = None  # MLP width inside each block; None = 4 * d_model
    dropout: float = 0.0  # nanoGPT's default; distillation targets already regularise
    max_len: int = 1024  # longest sequence the learned positions cover
    tie: bool = True  # share input embedding and output head: V * d_model weights once, not twice


def _vector(inputs: dict[str, Tensor], names: list[str]) -> Tensor:
    """The named float inputs, each flattened to [B, F_i], concatenated in ``names`` order: [B, sum F_i]."""
    parts = [inputs[name].flatten(1) for name in names]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class MLPStudent(nn.Module):
    """The vector of its inputs [B, F] -> (Linear, ReLU) per width -> Linear -> logits [B, C]; hidden[i] [B, hidden[i]].

    input_dims: {dataset column: features}, read and concatenated in this order (F = the sum).
    """

    def __init__(self, input_dims: dict[str, int], num_outputs: int, options: MLPOptions):
        super().__init__()
        self.input_names = list(input_dims)
        widths = [sum(input_dims.values()), *options.hidden]
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(options.dropout)
        self.head = nn.Linear(widths[-1], num_outputs)
        self.num_layers = len(self.layers)

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        h = _vector(inputs, self.input_names)
        hidden = []
        for layer in self.layers:
            h = layer(h)
            hidden.append(h)  # before dropout, so feature targets see the clean activation
            h = self.dropout(h)
        return StudentOutput(self.head(h), hidden)


class CNN1dStudent(nn.Module):
    """The vector of its inputs [B, F] as [B, 1, F] -> (Conv1d stride 2, ReLU) per channel count -> Linear -> [B, C].

    input_dims: {dataset column: features}, read and concatenated in this order (F = the sum). hidden[i] is layer
    i's map [B, C_i, L_i] flattened to [B, C_i * L_i], L_i = (L_{i-1} - 1) // 2 + 1 for odd kernels.
    """

    def __init__(self, input_dims: dict[str, int], num_outputs: int, options: CNN1dOptions):
        super().__init__()
        self.input_names = list(input_dims)
        input_dim = sum(input_dims.values())
        k = options.kernel
        channels = [1, *options.channels]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv1d(a, b, k, stride=2, padding=k // 2), nn.ReLU())
            for a, b in zip(channels, channels[1:])
        )
        length = input_dim
        for _ in options.channels:
            length = (length + 2 * (k // 2) - k) // 2 + 1
        if length < 1:
            raise ConfigError(
                f"cnn1d with {len(options.channels)} stride-2 layers and kernel={k} shrinks input_dim={input_dim} "
                "to nothing; use fewer channels entries or a smaller kernel"
            )
        self.head = nn.Linear(channels[-1] * length, num_outputs)
        self.num_layers = len(self.layers)

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        h = _vector(inputs, self.input_names).unsqueeze(1)
        hidden = []
        for layer in self.layers:
            h = layer(h)
            hidden.append(h.flatten(1))
        return StudentOutput(self.head(h.flatten(1)), hidden)


class _Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); x [B, S, D] -> [B, S, D]."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """attn_mask: bool [B, 1, S, S], True = may attend; or None with is_causal for a plain causal mask."""
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, dim=-1))
        p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, s, d)))
        return x + self.dropout(self.mlp(self.ln2(x)))


def _gpt_init(module: nn.Module) -> None:
    """GPT-2 initialisation (N(0, 0.02) weights, zero biases): keeps tied-embedding logits small at the start."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class _Trunk(nn.Module):
    """Token + learned position embeddings -> blocks: ids [B, S], positions [B, S] or [S] -> hidden, each [B, S, D]."""

    def __init__(self, vocab_size: int, options: TransformerOptions | CausalLMOptions):
        super().__init__()
        d = options.d_model
        self.tokens = nn.Embedding(vocab_size, d)
        self.positions = nn.Embedding(options.max_len, d)  # positions >= max_len raise an index error
        self.dropout = nn.Dropout(options.dropout)
        ffn = options.ffn or 4 * d
        self.blocks = nn.ModuleList(_Block(d, options.heads, ffn, options.dropout) for _ in range(options.layers))

    def forward(self, ids: Tensor, positions: Tensor, attn_mask: Tensor | None, is_causal: bool) -> list[Tensor]:
        h = self.dropout(self.tokens(ids) + self.positions(positions))
        hidden = []
        for block in self.blocks:
            h = block(h, attn_mask=attn_mask, is_causal=is_causal)
            hidden.append(h)
        return hidden


class TransformerStudent(nn.Module):
    """Encoder classifier: embeddings -> pre-LN blocks -> LayerNorm -> mean over real tokens -> Linear.

    input_ids [B, S] (and attention_mask [B, S]) -> logits [B, C]; hidden[i] [B, S, d_model]. Padding, left or
    right, does not change the logits: padded keys are masked out of attention, positions count real tokens
    only, and the mean pools real tokens only. A row of padding only pools to zeros (logits = the head's bias).
    """

    def __init__(self, vocab_size: int, num_outputs: int, options: TransformerOptions):
        super().__init__()
        self.trunk = _Trunk(vocab_size, options)
        self.norm = nn.LayerNorm(options.d_model)
        self.head = nn.Linear(options.d_model, num_outputs)
        self.num_layers = options.layers
        self.apply(_gpt_init)

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        # Each query may also see itself, so a padded query never has every key masked (NaN softmax in ONNX).
        self_only = torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
        hidden = self.trunk(ids, positions, attn_mask=real[:, None, None, :] | self_only, is_causal=False)
        weights = real.unsqueeze(-1).to(hidden[-1].dtype)
        pooled = (self.norm(hidden[-1]) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return StudentOutput(self.head(pooled), hidden)


class CausalLMStudent(nn.Module):
    """Decoder-only GPT-style LM: embeddings -> pre-LN causal blocks -> LayerNorm -> Linear (tied by default).

    input_ids [B, S] -> logits [B, S, V]; hidden[i] [B, S, d_model]. Uses the plain causal mask
    (``is_causal=True``, which keeps the fused attention kernels) and ignores attention_mask: with right padding
    every real token sees only itself and earlier real tokens, and the trainer masks padded positions out of the
    loss. Left padding is not supported.
    """

    def __init__(self, vocab_size: int, options: CausalLMOptions):
        super().__init__()
        self.trunk = _Trunk(vocab_size, options)
        self.norm = nn.LayerNorm(options.d_model)
        self.head = nn.Linear(options.d_model, vocab_size, bias=False)
        self.apply(_gpt_init)
        if options.tie:
            self.head.weight = self.trunk.tokens.weight
        self.num_layers = options.layers

    def forward(self, inputs: dict[str, Tensor]) -> StudentOutput:
        ids = inputs["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.trunk(ids, positions, attn_mask=None, is_causal=True)
        return StudentOutput(self.head(self.norm(hidden[-1])), hidden)


# ---- your own builder: module:function ------------------------------------------------------------------------
