"""Transformer encoder text classifier: an encoder-only Transformer (as BERT, here trained from scratch) over the
same batches as the RNN and fastText classifiers, so `model.name=encoder` swaps it in.

Token ids (B, T), right-padded with 0 -> token embedding (+ learned or sinusoidal positions; or rotary positions
in attention, Su et al. 2021) -> `n_layer` encoder layers of models/transformer.py (multi-head self-attention by
`scaled_dot_product_attention` under a key padding mask, ReLU feed-forward; pre-norm by default) -> a final
LayerNorm -> pooling -> a linear head.

Pooling: `cls`, the final state of a learned vector put before every text at position 0 (Devlin et al. 2019),
`mean` over the real positions, or `max` (element-wise, over the real positions). Padding is never a key and
never pooled, so the logits of a text are the same whatever batch it is padded into (tested). `TextEncoder`
(ids -> states) is the part a tagger or a masked-LM head can reuse; `attention(x)` returns every layer's
self-attention weights of one text for a heat map (the classification report draws it).

`EncoderMLM` (model `encoder-mlm`, task `mlm`) is BERT's masked-LM head on the same `TextEncoder`, its tensors named
as the classifier's (`encoder.*`): `init.from` a pretraining run copies the whole encoder into a classifier of the
same sizes, and only the classifier's head starts new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..data.corpus import MaskedTextSpec
from ..data.sentences import TextSpec
from . import gpt2_init, models
from .transformer import BlockConfig, EncoderLayer, add_positions, check_blocks

POOLINGS = ("cls", "mean", "max")


@dataclass
class EncoderConfig:
    name: str = "encoder"
    n_layer: int = 2  # encoder layers
    n_head: int = 4  # attention heads per layer (n_embd must divide by it)
    n_embd: int = 128  # width of the token embeddings and the residual stream
    ff_mult: int = 4  # feed-forward width = ff_mult * n_embd
    dropout: float = 0.1  # on embeddings, attention weights, residual branches and the pooled vector (training)
    norm: str = "pre"  # pre: x + f(LN(x)), a final LayerNorm | post: LN(x + f(x)), the 2017 layout
    positions: str = "learned"  # learned (spec.max_len + 1 rows) | sinusoidal | rotary (RoPE on queries, keys)
    pooling: str = "mean"  # cls (a learned first token's final state) | mean | max, over the real positions

    def __post_init__(self) -> None:
        check_blocks(self)
        check(self.pooling in POOLINGS, "model.pooling", f"must be one of {', '.join(POOLINGS)}")


class TextEncoder(nn.Module):
    """Token ids (B, T), right-padded with `pad_id` -> states (B, T', C) and the real positions (B, T'); with
    `cls`, a learned vector leads every text (T' = T + 1)."""

    def __init__(self, cfg: BlockConfig, n_layer: int, vocab_size: int, max_len: int, pad_id: int = 0,
                 cls: bool = False):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        C = cfg.n_embd
        self.tok = nn.Embedding(vocab_size, C)
        self.cls = nn.Parameter(torch.randn(1, 1, C) * 0.02) if cls else None
        self.pos = nn.Embedding(max_len + int(cls), C) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(n_layer))
        self.ln = nn.LayerNorm(C) if cfg.norm == "pre" else nn.Identity()  # post-norm layers end in one

    def forward(self, x: Tensor, record: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`record` collects each layer's self-attention weights (B, nh, T', T')."""
        B, T = x.shape
        real = x != self.pad_id  # (B, T)
        real[:, 0] = True  # a row of padding only (TextSpec never makes one) attends to its first token, not nothing
        h = self.tok(x)  # (B, T, C)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(B, 1, -1).to(h.dtype), h], dim=1)  # (B, T + 1, C)
            real = torch.cat([real.new_ones(B, 1), real], dim=1)  # (B, T + 1)
        pos = torch.arange(h.shape[1], device=x.device)  # (T',)
        h = self.drop(add_positions(h, pos, self.cfg, self.pos))
        mask = real[:, None, None, :]  # (B, 1, 1, T'): every query attends to the real keys
        for layer in self.layers:
            h = layer(h, mask, pos, record)
        return self.ln(h), real


class EncoderClassifier(nn.Module):
    def __init__(self, cfg: EncoderConfig, spec: TextSpec):
        super().__init__()
        self.cfg, self.max_len = cfg, spec.max_len
        self.encoder = TextEncoder(cfg, cfg.n_layer, spec.vocab_size, spec.max_len, spec.pad_id,
                                   cls=cfg.pooling == "cls")
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.n_embd, spec.num_classes)
        self.apply(gpt2_init)

    def forward(self, x: Tensor) -> Tensor:  # (B, T) token ids, right-padded -> (B, num_classes) logits
        h, real = self.encoder(x)  # (B, T', C), (B, T')
        if self.cfg.pooling == "cls":
            pooled = h[:, 0]  # (B, C)
        elif self.cfg.pooling == "mean":
            pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).to(h.dtype)  # (B, C)
        else:
            pooled = h.masked_fill(~real[..., None], float("-inf")).amax(1)  # (B, C)
        return self.head(self.drop(pooled))

    @torch.no_grad()
    def attention(self, x: Tensor) -> Tensor:
        """Self-attention weights (n_layer, n_head, T', T') of one text `x` (1, T): row i is how position i
        attends to each position (0 on padding). With `cls` pooling, position 0 is the CLS vector (T' = T + 1)."""
        record: list[Tensor] = []
        self.encoder(x[:1], record)
        return torch.stack(record)[:, 0]  # (L, nh, T', T')

    def flops_per_sample(self) -> float:
        """Training FLOPs of one text of `spec.max_len` tokens (an upper bound for shorter texts, though a batch
        pads to its longest): 6 per matmul weight per token plus attention's 12 * n_layer * n_embd * T per token
        (as gpt.py; Kaplan et al. 2020), and the head once. Embeddings are lookups, not counted."""
        T = self.max_len + int(self.cfg.pooling == "cls")
        n = sum(p.numel() for p in self.encoder.layers.parameters() if p.ndim == 2)
        return T * (6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * T) + 6 * self.head.weight.numel()


def _encoder(cfg: EncoderConfig, spec: TextSpec) -> EncoderClassifier:
    """Transformer encoder text classifier (pre-norm; learned, sinusoidal or rotary positions; cls/mean/max)."""
    return EncoderClassifier(cfg, spec)


class EncoderMLM(nn.Module):
    """Masked-LM head on `TextEncoder` (Devlin et al. 2019): each state -> dense, GELU, LayerNorm -> logits by the
    token embedding itself (weight tying, Press & Wolf 2017) plus a bias per token. Of `EncoderConfig`'s fields,
    `pooling` only says whether a CLS vector leads every text (`cls`), so that a cls-pooled classifier finds it
    (and position tables of its size) pretrained; its state is never predicted."""

    MASKED = 0.15  # the share of positions the head runs on at the mlm task's default masking (flops_per_sample)

    def __init__(self, cfg: EncoderConfig, spec: TextSpec):
        super().__init__()
        self.cfg, self.max_len, C = cfg, spec.max_len, cfg.n_embd
        self.encoder = TextEncoder(cfg, cfg.n_layer, spec.vocab_size, spec.max_len, spec.pad_id,
                                   cls=cfg.pooling == "cls")
        self.mlm = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C))
        self.bias = nn.Parameter(torch.zeros(spec.vocab_size))
        self.apply(gpt2_init)

    def forward(self, x: Tensor, where: Tensor | None = None) -> Tensor:
        """Token ids (B, T), right-padded -> logits (B, T, V), or (N, V) at the N positions where `where` (B, T)
        is True (the masked ones: the head's vocabulary-wide matmul runs on those alone)."""
        h, _ = self.encoder(x)  # (B, T', C)
        h = h[:, h.shape[1] - x.shape[1]:]  # (B, T, C): without the CLS vector
        if where is not None:
            h = h[where]  # (N, C)
        return F.linear(self.mlm(h), self.encoder.tok.weight, self.bias)  # (..., V)

    def flops_per_sample(self) -> float:
        """Training FLOPs of one text of `max_len` tokens: the encoder's (as `EncoderClassifier`'s) and the head's
        dense and tied output layers on the `MASKED` share of the positions."""
        T = self.max_len + int(self.cfg.pooling == "cls")
        n = sum(p.numel() for p in self.encoder.layers.parameters() if p.ndim == 2)
        head = self.mlm[0].weight.numel() + self.encoder.tok.weight.numel()
        return T * (6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * T) + self.MASKED * self.max_len * 6 * head


def _encoder_mlm(cfg: EncoderConfig, spec: MaskedTextSpec) -> EncoderMLM:
    """Transformer encoder with a masked-LM head (BERT-style pretraining; fine-tune as `encoder` by init.from)."""
    return EncoderMLM(cfg, spec)


EXAMPLE = TextSpec(vocab_size=50, num_classes=3, classes=["negative", "neutral", "positive"], max_len=16)
models.register("encoder", config=EncoderConfig, example=EXAMPLE)(_encoder)
models.register("encoder-mlm", config=EncoderConfig, example=MaskedTextSpec(vocab_size=50, max_len=16))(_encoder_mlm)
