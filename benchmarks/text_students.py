"""A fastText-style student for the text benchmark, loaded by ``--student benchmarks/text_students.py:embedding_bag``.

input_ids [B, S] (and attention_mask [B, S]) -> token embeddings -> mean over real tokens -> dropout ->
(Linear, ReLU) when hidden > 0 -> Linear -> logits [B, C]. Word order is ignored: the cheapest model over the
teacher's tokenizer, and the one furthest from the teacher's architecture.
"""

from __future__ import annotations

from torch import Tensor, nn


class EmbeddingBagStudent(nn.Module):
    def __init__(self, vocab_size: int, num_outputs: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or dim, num_outputs)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        weights = (ids.new_ones(ids.shape) if mask is None else mask).unsqueeze(-1).float()  # [B, S, 1]
        pooled = (self.embed(ids) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.mlp(self.dropout(pooled)))


def embedding_bag(num_outputs: int, vocab_size: int, dim: int = 64, hidden: int = 0, dropout: float = 0.1) -> nn.Module:
    """dim: embedding width; hidden: width of one ReLU layer after pooling (0 = none); dropout on the pooled vector."""
    return EmbeddingBagStudent(vocab_size, num_outputs, dim, hidden, dropout)
