"""fastText text classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification"): the mean
of the embeddings of a text's words and of its hashed word n-grams (bigrams, and trigrams with `ngrams: 3`), over
the real positions -> a linear head.

As in the paper, n-grams share a fixed table of `buckets` rows by hashing (the hashing trick; fastText's own
default is 2M rows, the paper's 10M): two n-grams may share a row, which costs little accuracy and bounds the
memory whatever the corpus. An n-gram is n adjacent real words; padding never enters the mean, so the logits
of a text do not depend on the batch it is padded into. The input vectors start uniform in +-1/dim and the
head at zero, as in fastText's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import check
from ..data.sentences import TextSpec
from . import models

HASH_MUL = 116_049_371  # multiplier of the bigram hash (the one fastText's word n-gram hash uses)


@dataclass
class FastTextConfig:
    name: str = "fasttext"
    dim: int = 64  # embedding width of words and bigrams (the paper: 10)
    buckets: int = 2**18  # rows of the hashed n-gram table (0: words only); 2**18 x 64 floats = 64 MiB
    ngrams: int = 2  # the longest word n-gram embedded besides the words: 2 (bigrams) | 3 (and trigrams)
    dropout: float = 0.0  # on the mean embedding, before the head

    def __post_init__(self) -> None:
        check(self.dim >= 1, "model.dim", "must be >= 1")
        check(self.buckets >= 0, "model.buckets", "must be >= 0")
        check(self.ngrams in (2, 3), "model.ngrams", "must be 2 (bigrams) or 3 (bigrams and trigrams)")
        check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")


class FastText(nn.Module):
    def __init__(self, cfg: FastTextConfig, vocab_size: int, num_classes: int, pad_id: int = 0):
        super().__init__()
        self.pad_id, self.buckets, self.ngrams = pad_id, cfg.buckets, cfg.ngrams
        self.words = nn.Embedding(vocab_size, cfg.dim, padding_idx=pad_id)
        self.bigrams = nn.Embedding(cfg.buckets, cfg.dim) if cfg.buckets else None
        for emb in (self.words, self.bigrams):
            if emb is not None:
                nn.init.uniform_(emb.weight, -1 / cfg.dim, 1 / cfg.dim)
        with torch.no_grad():
            self.words.weight[pad_id].zero_()  # the padding row stays zero (it gets no gradient)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, T) word ids, right-padded -> (B, num_classes) logits
        real = x != self.pad_id  # (B, T)
        total = (self.words(x) * real[..., None]).sum(1)  # (B, D)
        count = real.sum(1)  # (B,)
        h, ok = x, real  # (B, T): the hash of the n-gram ending at each position, and whether it is all real
        for n in range(2, self.ngrams + 1 if self.bigrams is not None else 2):
            if x.shape[1] < n:
                break
            ok = ok[:, :-1] & real[:, n - 1:]  # (B, T-n+1): n real words
            h = (h[:, :-1] * HASH_MUL + x[:, n - 1:]) % self.buckets  # (B, T-n+1) bucket of each n-gram
            total = total + (self.bigrams(h) * ok[..., None]).sum(1)  # (B, D)
            count = count + ok.sum(1)
        mean = total / count.clamp(min=1)[:, None].to(total.dtype)  # (B, D)
        return self.head(self.drop(mean))


def _fasttext(cfg: FastTextConfig, spec: TextSpec) -> FastText:
    """Mean of word and hashed-bigram embeddings -> linear (Joulin et al. 2017)."""
    return FastText(cfg, spec.vocab_size, spec.num_classes, spec.pad_id)


EXAMPLE = TextSpec(vocab_size=50, num_classes=2, classes=["negative", "positive"], max_len=16)
models.register("fasttext", config=FastTextConfig, example=EXAMPLE)(_fasttext)
