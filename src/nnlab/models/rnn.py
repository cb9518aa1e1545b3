"""Recurrent text classifier: word embeddings -> an RNN, LSTM or GRU (uni- or bidirectional, stacked) -> a
pooling of its outputs over the real positions -> a linear head.

Sequences are packed (`pack_padded_sequence`), so the recurrence never reads padding: the logits of a text are
the same whatever the batch it is padded into. Pooling: `max` over time (Collobert et al. 2011; Conneau et al.
2017 found it the best of these for BiLSTM sentence encoders), `mean`, or `last`, the final state of each
direction (the forward one after the last real token, the backward one after the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..config import check
from ..data.sentences import TextSpec
from . import models

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RNNConfig:
    name: str = "rnn"
    cell: str = "lstm"  # rnn (Elman, tanh) | lstm | gru
    bidirectional: bool = True  # a second recurrence reads each text backwards; outputs are concatenated
    n_layer: int = 1  # stacked recurrent layers
    embed: int = 128  # word embedding width
    hidden: int = 128  # hidden units per direction and layer
    dropout: float = 0.3  # on the embeddings, between stacked layers and before the head
    pooling: str = "max"  # over the real positions: max | mean | last (the final state of each direction)

    def __post_init__(self) -> None:
        check(self.cell in CELLS, "model.cell", "must be rnn, lstm or gru")
        check(self.pooling in ("max", "mean", "last"), "model.pooling", "must be max, mean or last")
        for key in ("n_layer", "embed", "hidden"):
            check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")


class RNNClassifier(nn.Module):
    def __init__(self, cfg: RNNConfig, vocab_size: int, num_classes: int, pad_id: int = 0):
        super().__init__()
        self.pooling, self.pad_id = cfg.pooling, pad_id
        self.dirs = 2 if cfg.bidirectional else 1
        self.embed = nn.Embedding(vocab_size, cfg.embed, padding_idx=pad_id)
        self.rnn = CELLS[cfg.cell](cfg.embed, cfg.hidden, num_layers=cfg.n_layer, batch_first=True,
                                   bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.dirs * cfg.hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, T) word ids, right-padded -> (B, num_classes) logits
        B, T = x.shape
        lengths = (x != self.pad_id).sum(1).clamp(min=1)  # (B,) an all-padding row reads one padding token
        e = self.drop(self.embed(x))  # (B, T, E)
        packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        if self.pooling == "last":
            h = h[0] if isinstance(h, tuple) else h  # an LSTM's (h, c): the hidden state
            pooled = h[-self.dirs:].transpose(0, 1).reshape(B, -1)  # last layer (D, B, H) -> (B, D * H)
        else:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, D * H), 0 at padding
            real = (torch.arange(T, device=x.device)[None] < lengths[:, None])[..., None]  # (B, T, 1)
            if self.pooling == "max":
                pooled = out.masked_fill(~real, float("-inf")).amax(1)  # (B, D * H)
            else:
                pooled = out.sum(1) / lengths[:, None].to(out.dtype)  # (B, D * H)
        return self.head(self.drop(pooled))


def _rnn(cfg: RNNConfig, spec: TextSpec) -> RNNClassifier:
    """Embedding -> (Bi)RNN/LSTM/GRU -> max/mean/last pooling over real positions -> linear."""
    return RNNClassifier(cfg, spec.vocab_size, spec.num_classes, spec.pad_id)


EXAMPLE = TextSpec(vocab_size=50, num_classes=3, classes=["negative", "neutral", "positive"], max_len=16)
models.register("rnn", config=RNNConfig, example=EXAMPLE)(_rnn)
