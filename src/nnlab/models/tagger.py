"""Sequence tagger: a linear-chain CRF, character-level word features, and a BiLSTM-CRF over both (Lample et al.
2016, "Neural Architectures for Named Entity Recognition"; Ma & Hovy 2016, "End-to-end Sequence Labeling via
Bi-directional LSTM-CNNs-CRF").

    word embedding ++ char features (CNN + max-pool, or BiLSTM final states) [++ Transformer encoder states]
    -> dropout -> BiLSTM (or none) -> dropout -> linear: emission scores (B, T, num_tags) -> CRF (or softmaxes)

The Transformer encoder (`encoder_layers` > 0) is models/encoder.py's `TextEncoder`, named `encoder.*` as in the
masked-LM model `encoder-mlm`: `init.from` a conll-mlm run copies it (with `data.vocab_from` that run, it reads
the words' ids under the run's tokenizer, the batch's `tokens`; Peters et al. 2018 feed a pretrained LM's states
to a BiLSTM-CRF this way). Without the BiLSTM (`lstm: false`) the encoder alone gives each word its context.

The contract with the tagging task (tasks/tagging.py, its `Tagger` protocol):
- `forward(x, chars, tokens=)` -> emission scores (B, T, num_tags); `forward(x, chars, y, tokens=)` -> each
  sentence's negative log-likelihood (B,), summed over its words. `tokens` (B, T): the words' ids under a
  pretrained tokenizer (None: the encoder reads x). The loss is computed inside `forward` so that
  DistributedDataParallel, which wraps only `forward`, sees every parameter it uses (the CRF's transitions too).
- `nll(emissions, y, mask)` -> (B,) and `decode(emissions, mask)` -> (B, T) best tag ids: the CRF's, or without
  a CRF the token cross-entropy and the argmax.
Masks are (B, T) bool, True at real words, right-padded: every sequence has at least its first word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..data.conll import IGNORE, TagSpec
from ..errors import UserError
from ..optim import general_groups
from . import gpt2_init, models
from .encoder import EncoderConfig, TextEncoder
from .rnn import Recurrent


class CRF(nn.Module):
    """A linear-chain CRF over `num_tags` tags (Lafferty et al. 2001). The score of tags y_1..y_n for emissions e:
    start[y_1] + sum_t e_t[y_t] + sum_t trans[y_t, y_t+1] + end[y_n]; p(y) = exp(score(y)) / Z, with log Z from
    the forward algorithm in log space and the best y from Viterbi, both batched over sentences (a loop over
    positions only). Run in fp32: log-sum-exp over long sentences loses too much in bf16."""

    def __init__(self, num_tags: int):
        super().__init__()
        self.trans = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))  # [from, to]
        self.start = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))

    def score(self, em: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """The unnormalised score (B,) of the tags y (B, T) (any value at padding)."""
        y = y.masked_fill(~mask, 0)
        emit = em.gather(2, y[..., None]).squeeze(2)  # (B, T)
        trans = self.trans[y[:, :-1], y[:, 1:]]  # (B, T-1): from each tag to the next
        last = y.gather(1, mask.sum(1, keepdim=True) - 1).squeeze(1)  # (B,) the tag at the last real word
        return self.start[y[:, 0]] + (emit * mask).sum(1) + (trans * mask[:, 1:]).sum(1) + self.end[last]

    def log_partition(self, em: Tensor, mask: Tensor) -> Tensor:
        """log Z (B,): the forward algorithm, alpha_t[j] = logsumexp_i(alpha_t-1[i] + trans[i, j]) + e_t[j]."""
        alpha = self.start + em[:, 0]  # (B, K)
        for t in range(1, em.shape[1]):
            nxt = torch.logsumexp(alpha[:, :, None] + self.trans, dim=1) + em[:, t]  # (B, K, K) -> (B, K)
            alpha = torch.where(mask[:, t, None], nxt, alpha)  # past the end: unchanged
        return torch.logsumexp(alpha + self.end, dim=1)

    def nll(self, em: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """-log p(y) (B,)."""
        em = em.float()
        return self.log_partition(em, mask) - self.score(em, y, mask)

    @torch.no_grad()
    def decode(self, em: Tensor, mask: Tensor) -> Tensor:
        """Viterbi: the highest-scoring tags (B, T); past a sentence's end, its last tag repeated."""
        em = em.float()
        K = em.shape[2]
        score, back = self.start + em[:, 0], []  # (B, K) best score of a path ending in each tag
        keep = torch.arange(K, device=em.device).expand_as(score)  # a backpointer to itself past the end
        for t in range(1, em.shape[1]):
            best, arg = (score[:, :, None] + self.trans).max(dim=1)  # (B, K): over the previous tag
            real = mask[:, t, None]
            score = torch.where(real, best + em[:, t], score)
            back.append(torch.where(real, arg, keep))
        tag = (score + self.end).argmax(1)  # (B,) the best last tag (at the last real word and after it)
        path = [tag]
        for arg in reversed(back):
            tag = arg.gather(1, tag[:, None]).squeeze(1)
            path.append(tag)
        return torch.stack(path[::-1], dim=1)


class CharCNN(nn.Module):
    """Ma & Hovy 2016: character embeddings -> one convolution over each word's characters -> max over them."""

    def __init__(self, vocab: int, embed: int, filters: int, kernel: int, dropout: float):
        super().__init__()
        self.dim = filters
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.drop = nn.Dropout(dropout)  # on the character embeddings, as in the paper
        self.conv = nn.Conv1d(embed, filters, kernel, padding=kernel // 2)

    def forward(self, chars: Tensor) -> Tensor:  # (N, W) character ids of N words -> (N, filters)
        h = self.conv(self.drop(self.embed(chars)).transpose(1, 2))  # (N, E, W) -> (N, F, W)
        return h.masked_fill((chars == 0)[:, None, : h.shape[2]], float("-inf")).amax(2)


class CharLSTM(nn.Module):
    """Lample et al. 2016: character embeddings -> a BiLSTM over each word -> its two final states."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.dim, self.hidden = 2 * hidden, hidden
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = Recurrent(embed, hidden, 1, True, 0.0)

    def forward(self, chars: Tensor) -> Tensor:  # (N, W) -> (N, 2 * hidden)
        lengths = (chars != 0).sum(1).clamp(min=1)
        return self.lstm.last(self.lstm(self.embed(chars), lengths), lengths)  # each direction's final state


@dataclass
class TaggerConfig:
    name: str = "tagger"
    embed: int = 100  # word embedding width
    char: str = "cnn"  # character features of each word: cnn (Ma & Hovy) | lstm (Lample et al.) | none
    char_embed: int = 30  # character embedding width
    char_hidden: int = 30  # cnn: filters; lstm: hidden units per direction
    char_kernel: int = 3  # cnn: characters per convolution window
    lstm: bool = True  # a BiLSTM over the word features (False: they go straight to the output layer)
    hidden: int = 200  # LSTM hidden units per direction and layer
    n_layer: int = 1  # stacked BiLSTM layers
    bidirectional: bool = True  # a second LSTM reads each sentence backwards; outputs are concatenated
    dropout: float = 0.5  # on the LSTM's input and output (and the character embeddings of the cnn)
    crf: bool = True  # a CRF over the tags (False: an independent softmax per word)
    encoder_layers: int = 0  # Transformer encoder layers over the words (models/encoder.py); 0: no encoder
    n_head: int = 4  # encoder: attention heads per layer
    n_embd: int = 128  # encoder: width (a pretrained encoder's, to be copied by init.from)
    ff_mult: int = 4  # encoder: feed-forward width = ff_mult * n_embd
    norm: str = "pre"  # encoder: pre | post layer norm
    positions: str = "learned"  # encoder: learned (data.max_len rows) | sinusoidal | rotary
    encoder_dropout: float = 0.1  # encoder: dropout inside its layers
    encoder_lr: float = 0.0  # encoder: its own peak learning rate (a pretrained one: lower); 0: optim.lr

    def __post_init__(self) -> None:
        check(self.char in ("cnn", "lstm", "none"), "model.char", "must be cnn, lstm or none")
        for key in ("embed", "char_embed", "char_hidden", "char_kernel", "hidden", "n_layer"):
            check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        check(self.char_kernel % 2 == 1, "model.char_kernel", "must be odd (the window is centred on a character)")
        check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        check(self.encoder_layers >= 0 and self.encoder_lr >= 0, "model.encoder_layers", "must be >= 0")
        check(self.lstm or self.encoder_layers > 0 or self.char != "none", "model.lstm",
              "a tagger without a BiLSTM needs an encoder (encoder_layers > 0) or character features")
        if self.encoder_layers:
            self.blocks()

    def blocks(self) -> EncoderConfig:
        """The encoder's config (checked as `model.<key>`)."""
        return EncoderConfig(n_layer=self.encoder_layers, n_head=self.n_head, n_embd=self.n_embd,
                             ff_mult=self.ff_mult, dropout=self.encoder_dropout, norm=self.norm,
                             positions=self.positions)


class BiLSTMTagger(nn.Module):
    def __init__(self, cfg: TaggerConfig, spec: TagSpec):
        super().__init__()
        self.cfg = cfg
        self.encoder = None
        if cfg.encoder_layers:  # first, so that its GPT-2 initialisation leaves the rest's draws as without it
            self.encoder = TextEncoder(cfg.blocks(), cfg.encoder_layers, spec.token_vocab_size or spec.vocab_size,
                                       spec.max_len)
            self.encoder.apply(gpt2_init)
        vocab_size, char_vocab_size, num_tags = spec.vocab_size, spec.char_vocab_size, spec.num_tags
        self.embed = nn.Embedding(vocab_size, cfg.embed, padding_idx=0)
        self.chars: CharCNN | CharLSTM | None = None
        if cfg.char == "cnn":
            self.chars = CharCNN(char_vocab_size, cfg.char_embed, cfg.char_hidden, cfg.char_kernel, cfg.dropout)
        elif cfg.char == "lstm":
            self.chars = CharLSTM(char_vocab_size, cfg.char_embed, cfg.char_hidden)
        width = cfg.embed + (self.chars.dim if self.chars else 0) + (cfg.n_embd if self.encoder else 0)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = Recurrent(width, cfg.hidden, cfg.n_layer, cfg.bidirectional, cfg.dropout) if cfg.lstm else None
        self.out = nn.Linear(self.lstm.dim if self.lstm else width, num_tags)
        self.crf = CRF(num_tags) if cfg.crf else None
        own = (m for n, m in self.named_modules() if isinstance(m, nn.Embedding) and not n.startswith("encoder"))
        for emb in own:  # U(+-sqrt(3/dim)): variance 1/dim
            bound = math.sqrt(3.0 / emb.embedding_dim)  # (Lample et al. 2016; Ma & Hovy 2016)
            with torch.no_grad():
                emb.weight.uniform_(-bound, bound)
                emb.weight[0].zero_()

    def forward(self, x: Tensor, chars: Tensor, y: Tensor | None = None, tokens: Tensor | None = None) -> Tensor:
        """x (B, T) word ids right-padded with 0, chars (B, T, W), tokens (B, T) the words' ids for the encoder
        (None: x) -> emissions (B, T, num_tags); with tags y (B, T), each sentence's negative log-likelihood (B,)."""
        mask = x != 0  # (B, T)
        B, T = x.shape
        e = self.embed(x)  # (B, T, E)
        if self.chars is not None:
            c = self.chars(chars[mask])  # (N, C): only the N real words
            e = torch.cat([e, e.new_zeros(B, T, c.shape[1]).masked_scatter(mask[..., None], c.to(e.dtype))], -1)
        if self.encoder is not None:
            limit = self.encoder.pos.num_embeddings if self.encoder.pos is not None else T
            if T > limit:
                raise UserError(f"a sentence of {T} words is longer than the encoder's {limit} learned positions: "
                                f"train with a larger data.max_len (or model.positions=rotary)")
            h, _ = self.encoder(x if tokens is None else tokens)  # (B, T, n_embd)
            e = torch.cat([e, h.to(e.dtype)], -1)
        h = self.drop(e) if self.lstm is None else self.lstm(self.drop(e), mask.sum(1))  # (B, T, D * H) or (B, T, F)
        em = self.out(self.drop(h))  # (B, T, num_tags)
        return em if y is None else self.nll(em, y, mask)

    def nll(self, em: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Each sentence's negative log-likelihood (B,): the CRF's, or the sum of its words' cross-entropies."""
        if self.crf is not None:
            return self.crf.nll(em, y, mask)
        ce = F.cross_entropy(em.float().transpose(1, 2), y.masked_fill(~mask, IGNORE), reduction="none")  # (B, T)
        return ce.sum(1)

    @torch.no_grad()
    def decode(self, em: Tensor, mask: Tensor) -> Tensor:
        """The best tag ids (B, T): Viterbi with a CRF, else each word's most likely tag."""
        return self.crf.decode(em, mask) if self.crf is not None else em.argmax(-1)


    def param_groups(self) -> list[dict]:
        """optim.py's general rule; with `encoder_lr`, each group's encoder part split off at that peak rate."""
        groups = general_groups(self)
        if self.encoder is None or not self.cfg.encoder_lr:
            return groups
        mine = {id(p) for p in self.encoder.parameters()}
        split = [(g, [p for p in g["params"] if (id(p) in mine) == enc], enc) for g in groups for enc in (False, True)]
        return [g | {"params": ps} | ({"lr": self.cfg.encoder_lr} if enc else {}) for g, ps, enc in split if ps]


def _tagger(cfg: TaggerConfig, spec: TagSpec) -> BiLSTMTagger:
    """Word embeddings ++ char CNN/BiLSTM features [++ Transformer encoder] -> BiLSTM -> emissions -> CRF."""
    return BiLSTMTagger(cfg, spec)


EXAMPLE = TagSpec(vocab_size=40, char_vocab_size=20, num_tags=9, max_len=16, scheme="bio",
                  tags=["O", *(f"{p}-{k}" for k in ("LOC", "MISC", "ORG", "PER") for p in "BI")])
models.register("tagger", config=TaggerConfig, example=EXAMPLE)(_tagger)
