"""Recurrent networks: a stacked, optionally bidirectional RNN/LSTM/GRU over right-padded sequences (`Recurrent`,
shared with the tagger) and the recurrent text classifier: word embeddings -> `Recurrent` -> a pooling of its
outputs over the real positions -> a linear head.

The recurrence never reads padding: the forward direction meets it only after a sequence's last real position,
the backward one reads each sequence reversed within its length. That equals torch's packed sequences (tested)
and trains 2.5x faster on a CPU, where the packed path runs step by step with a zero-filled gradient of the whole
input per step (torch 2.13, B=32, T=30, 200 units: 34 ms against 86 ms per forward + backward). So the logits of
a text are the same whatever the batch it is padded into. Pooling: `max` over time (Collobert et al. 2011;
Conneau et al. 2017 found it the best of these for BiLSTM sentence encoders), `mean`, or `last`, the final state
of each direction (the forward one after the last real token, the backward one after the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import check
from ..data.sentences import UNK_ID, TextSpec
from . import models

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def reverse(h: Tensor, lengths: Tensor) -> Tensor:
    """h (B, T, C) with each sequence's first `lengths` positions in reverse order, padding left in place (its own
    inverse)."""
    t = torch.arange(h.shape[1], device=h.device)
    idx = lengths[:, None] - 1 - t  # (B, T): where each position reads from
    idx = torch.where(idx >= 0, idx, t)
    return h.gather(1, idx[..., None].expand_as(h))


class Recurrent(nn.Module):
    """Stacked (bi)directional RNN/LSTM/GRU layers over right-padded sequences; outputs (B, T, dirs * hidden),
    with any values at padding. Dropout between stacked layers."""

    def __init__(self, width: int, hidden: int, layers: int, bidirectional: bool, dropout: float,
                 cell: str = "lstm"):
        super().__init__()
        dirs = 2 if bidirectional else 1
        self.dim, self.hidden = dirs * hidden, hidden

        def stack() -> nn.ModuleList:
            return nn.ModuleList(CELLS[cell](self.dim if i else width, hidden, batch_first=True) for i in range(layers))

        self.fwd = stack()
        self.bwd = stack() if bidirectional else None
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, lengths: Tensor) -> Tensor:  # (B, T, C), (B,) -> (B, T, dirs * hidden)
        for i, rnn in enumerate(self.fwd):
            h = self.drop(h) if i else h
            out = rnn(h)[0]  # (B, T, H)
            if self.bwd is not None:
                out = torch.cat([out, reverse(self.bwd[i](reverse(h, lengths))[0], lengths)], -1)  # (B, T, 2H)
            h = out
        return h

    def last(self, out: Tensor, lengths: Tensor) -> Tensor:
        """The final state of each direction (B, dirs * hidden) from the outputs: the forward one at the last real
        position, the backward one at the first (after reading the sequence from its end)."""
        fwd = out[torch.arange(len(out), device=out.device), lengths - 1, :self.hidden]  # (B, H)
        return fwd if self.bwd is None else torch.cat([fwd, out[:, 0, self.hidden:]], 1)


@dataclass
class RNNConfig:
    name: str = "rnn"
    cell: str = "lstm"  # rnn (Elman, tanh) | lstm | gru
    bidirectional: bool = True  # a second recurrence reads each text backwards; outputs are concatenated
    n_layer: int = 1  # stacked recurrent layers
    embed: int = 128  # word embedding width
    hidden: int = 128  # hidden units per direction and layer
    dropout: float = 0.3  # on the embeddings, between stacked layers and before the head
    word_dropout: float = 0.0  # training: each word is read as the unknown word with this probability
    pooling: str = "max"  # over the real positions: max | mean | last (the final state of each direction)

    def __post_init__(self) -> None:
        check(self.cell in CELLS, "model.cell", "must be rnn, lstm or gru")
        check(self.pooling in ("max", "mean", "last"), "model.pooling", "must be max, mean or last")
        for key in ("n_layer", "embed", "hidden"):
            check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        check(0 <= self.dropout < 1 and 0 <= self.word_dropout < 1, "model.dropout", "must be in [0, 1)")


class RNNClassifier(nn.Module):
    def __init__(self, cfg: RNNConfig, vocab_size: int, num_classes: int, pad_id: int = 0):
        super().__init__()
        self.pooling, self.pad_id, self.word_dropout = cfg.pooling, pad_id, cfg.word_dropout
        self.embed = nn.Embedding(vocab_size, cfg.embed, padding_idx=pad_id)
        self.rnn = Recurrent(cfg.embed, cfg.hidden, cfg.n_layer, cfg.bidirectional, cfg.dropout, cfg.cell)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.rnn.dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, T) word ids, right-padded -> (B, num_classes) logits
        T = x.shape[1]
        lengths = (x != self.pad_id).sum(1).clamp(min=1)  # (B,) an all-padding row reads one padding token
        if self.training and self.word_dropout:  # words as unknown (Iyyer et al. 2015 drop words from the input)
            x = x.masked_fill((torch.rand(x.shape, device=x.device) < self.word_dropout) & (x != self.pad_id), UNK_ID)
        out = self.rnn(self.drop(self.embed(x)), lengths)  # (B, T, D * H)
        if self.pooling == "last":
            pooled = self.rnn.last(out, lengths)  # (B, D * H)
        else:
            real = (torch.arange(T, device=x.device)[None] < lengths[:, None])[..., None]  # (B, T, 1)
            if self.pooling == "max":
                pooled = out.masked_fill(~real, float("-inf")).amax(1)  # (B, D * H)
            else:
                pooled = out.masked_fill(~real, 0.0).sum(1) / lengths[:, None].to(out.dtype)  # (B, D * H)
        return self.head(self.drop(pooled))


def _rnn(cfg: RNNConfig, spec: TextSpec) -> RNNClassifier:
    """Embedding -> (Bi)RNN/LSTM/GRU -> max/mean/last pooling over real positions -> linear."""
    return RNNClassifier(cfg, spec.vocab_size, spec.num_classes, spec.pad_id)


EXAMPLE = TextSpec(vocab_size=50, num_classes=3, classes=["negative", "neutral", "positive"], max_len=16)
models.register("rnn", config=RNNConfig, example=EXAMPLE)(_rnn)
