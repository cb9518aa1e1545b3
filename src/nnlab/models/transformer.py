"""The encoder-decoder Transformer of "Attention is all you need" (Vaswani et al. 2017) for translation, and the
blocks that the encoder-only text classifier (models/encoder.py) shares.

Source ids -> embedding (x sqrt(n_embd), + sinusoidal positions; or + learned positions; or rotary positions on
the queries and keys of self-attention, Su et al. 2021) -> `n_layer` encoder layers (self-attention, ReLU
feed-forward) -> memory. Target ids (BOS w1 ...) -> embedding -> `n_layer` decoder layers (causal
self-attention, cross-attention to the memory, feed-forward) -> logits by the target embedding itself (weight
tying, Press & Wolf 2017). With `norm="post"` each sub-layer is LN(x + f(x)), the paper's layout;
`norm="pre"` is x + f(LN(x)) with a final LayerNorm per stack, which trains without a careful warm-up (Xiong et
al. 2020). Attention runs in `scaled_dot_product_attention` under a boolean mask (True = may attend).

`greedy` and `beam_search` decode with a cache: the memory's keys and values are computed once per layer, and
each new target token attends to the cached self-attention keys and values of the tokens before it. Neither
ever emits PAD or BOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..data.text import PairSpec
from . import attend, gpt2_init, models
from .gpt import rotate

POSITIONS = ("sinusoidal", "learned", "rotary")


@dataclass
class TransformerConfig:
    name: str = "transformer"
    n_layer: int = 3  # encoder layers and decoder layers (each)
    n_head: int = 4  # attention heads per layer (n_embd must divide by it)
    n_embd: int = 256  # width of the residual stream (the paper's d_model)
    ff_mult: int = 4  # feed-forward width = ff_mult * n_embd (the paper's d_ff = 4 d_model)
    dropout: float = 0.1  # on attention weights, residual branches and embeddings (training only)
    norm: str = "pre"  # pre | post (post is the 2017 paper's layout; pre trains more stably)
    positions: str = "sinusoidal"  # sinusoidal (the paper's) | learned (a table per side) | rotary (RoPE)
    share_embeddings: bool = True  # when spec.shared: one embedding table for source, target and the output layer

    def __post_init__(self) -> None:
        check_blocks(self)


class BlockConfig(Protocol):
    """The fields the blocks read: TransformerConfig's here, EncoderConfig's in models/encoder.py."""

    n_head: int
    n_embd: int
    ff_mult: int
    dropout: float
    norm: str
    positions: str


def check_blocks(cfg: BlockConfig) -> None:
    """The checks of every config of these blocks (sizes, dropout, norm, positions), named as `model.<key>`."""
    for key in ("n_layer", "n_head", "n_embd", "ff_mult"):
        check(getattr(cfg, key) >= 1, f"model.{key}", "must be >= 1")
    check(cfg.n_embd % cfg.n_head == 0, "model.n_embd", f"must be divisible by model.n_head={cfg.n_head}")
    check(0 <= cfg.dropout < 1, "model.dropout", "must be in [0, 1)")
    check(cfg.norm in ("pre", "post"), "model.norm", "must be pre or post")
    check(cfg.positions in POSITIONS, "model.positions", f"must be one of {', '.join(POSITIONS)}")
    check(cfg.positions != "sinusoidal" or cfg.n_embd % 2 == 0, "model.n_embd",
          "sinusoidal positions need an even n_embd")
    check(cfg.positions != "rotary" or (cfg.n_embd // cfg.n_head) % 2 == 0, "model.n_embd",
          "rotary positions need an even head size (n_embd / n_head)")


def sinusoids(pos: Tensor, dim: int) -> Tensor:
    """The paper's position encoding (dim even) at positions `pos` (T,): PE(p, 2i) = sin(p / 10000^(2i/dim)),
    PE(p, 2i+1) = cos(p / 10000^(2i/dim))."""
    freq = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)  # (dim/2,)
    angle = pos.float()[:, None] * freq[None, :]  # (T, dim/2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).view(len(pos), dim)  # (T, dim), sin/cos interleaved


def add_positions(x: Tensor, pos: Tensor, cfg: BlockConfig, table: nn.Embedding | None) -> Tensor:
    """Token embeddings `x` (B, T, C) at positions `pos` (T,) with their positions: sinusoidal (the paper scales
    the embeddings by sqrt(d_model) before adding the sinusoids), learned (+ `table(pos)`), or rotary (`x`
    unchanged: attention rotates its queries and keys)."""
    if cfg.positions == "sinusoidal":
        return x * math.sqrt(cfg.n_embd) + sinusoids(pos, cfg.n_embd).to(x.dtype)
    if cfg.positions == "learned":
        assert table is not None
        if len(pos) and int(pos[-1]) >= table.num_embeddings:
            raise ValueError(f"a sequence of {int(pos[-1]) + 1} tokens exceeds the {table.num_embeddings} learned "
                             f"positions")
        return x + table(pos)
    return x


class Cache:
    """A generation's decoder state over N rows (sentences x beams): every layer's self-attention keys and values
    of the tokens so far, (N, nh, t, hs) each, and its cross-attention keys and values of the memory,
    (N, nh, S, hs) each, computed once."""

    def __init__(self, memory_kv: list[tuple[Tensor, Tensor]]):
        self.memory_kv = memory_kv
        self.kv: list[tuple[Tensor, Tensor] | None] = [None] * len(memory_kv)
        self.length = 0

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values to `layer`'s; return all of them."""
        old = self.kv[layer]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)  # (N, nh, t + 1, hs)
        self.kv[layer] = (k, v)
        return k, v

    def select(self, rows: Tensor) -> None:
        """Keep the self-attention state of `rows` (N,), in that order (beam search's survivors). The memory
        needs no reordering: rows only move among the beams of one sentence, which share it."""
        self.kv = [(k[rows], v[rows]) for k, v in self.kv]


class Attention(nn.Module):
    """Multi-head attention of queries from `x` over keys and values from `keys_values(y)` (y = x for
    self-attention, the memory for cross-attention). `rotary`: queries and keys are rotated to their positions
    `pos` (self-attention only; a query and a key then interact by their relative position)."""

    def __init__(self, cfg: BlockConfig, rotary: bool = False):
        super().__init__()
        self.n_head, self.dropout, self.rotary = cfg.n_head, cfg.dropout, rotary
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def heads(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def rope(self, x: Tensor, pos: Tensor | None) -> Tensor:
        """`x` (B, nh, T, hs) rotated to its positions `pos` (T,) when rotary; unchanged otherwise."""
        if not self.rotary:
            return x
        assert pos is not None, "rotary attention needs the positions"
        return rotate(x, pos)

    def keys_values(self, y: Tensor, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values (B, nh, S, hs) of `y` (B, S, C) at positions `pos` (S,)."""
        k, v = self.kv(y).chunk(2, dim=2)
        return self.rope(self.heads(k), pos), self.heads(v)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pos: Tensor | None = None) -> Tensor:
        """`mask` broadcasts to (B, nh, T, S), True where a query may attend to a key; None: everywhere.
        `pos` (T,): the queries' positions (read with rotary positions)."""
        B, T, C = x.shape
        y = attend(self.rope(self.heads(self.q(x)), pos), k, v, attn_mask=mask,
                   dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    def weights(self, x: Tensor, k: Tensor, mask: Tensor, pos: Tensor | None = None) -> Tensor:
        """The attention weights (B, nh, T, S) that `forward` applies (without dropout):
        softmax(Q K^T / sqrt(hs)) over the keys `mask` allows."""
        q = self.rope(self.heads(self.q(x)), pos)  # (B, nh, T, hs)
        att = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
        return att.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class Residual(nn.Module):
    """A sub-layer's LayerNorm and residual connection: pre-norm x + f(LN(x)), or post-norm LN(x + f(x))."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.ln, self.pre = nn.LayerNorm(cfg.n_embd), cfg.norm == "pre"

    def input(self, x: Tensor) -> Tensor:
        return self.ln(x) if self.pre else x

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y if self.pre else self.ln(x + y)


def feed_forward(cfg: BlockConfig) -> nn.Sequential:
    """The position-wise feed-forward network: Linear -> ReLU -> Linear (the paper's eq. 2), then dropout."""
    return nn.Sequential(nn.Linear(cfg.n_embd, cfg.ff_mult * cfg.n_embd), nn.ReLU(),
                         nn.Linear(cfg.ff_mult * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.attn, self.res1 = Attention(cfg, rotary=cfg.positions == "rotary"), Residual(cfg)
        self.ff, self.res2 = feed_forward(cfg), Residual(cfg)

    def forward(self, x: Tensor, mask: Tensor, pos: Tensor, record: list[Tensor] | None = None) -> Tensor:
        """`x` (B, T, C) at positions `pos` (T,); `record` collects the self-attention weights (B, nh, T, T)."""
        h = self.res1.input(x)
        k, v = self.attn.keys_values(h, pos)
        if record is not None:
            record.append(self.attn.weights(h, k, mask, pos))
        x = self.res1.add(x, self.attn(h, k, v, mask, pos))
        return self.res2.add(x, self.ff(self.res2.input(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.self_attn, self.res1 = Attention(cfg, rotary=cfg.positions == "rotary"), Residual(cfg)
        self.cross_attn, self.res2 = Attention(cfg), Residual(cfg)
        self.ff, self.res3 = feed_forward(cfg), Residual(cfg)

    def forward(self, x: Tensor, self_mask: Tensor | None, memory_kv: tuple[Tensor, Tensor], cross_mask: Tensor,
                pos: Tensor, cache: Cache | None = None, layer: int = 0, record: list[Tensor] | None = None
                ) -> Tensor:
        """`x` (B, T, C) at positions `pos` (T,). With a cache, `x` continues the cached tokens and attends to all
        of them (`self_mask` None); `record` collects the cross-attention weights."""
        h = self.res1.input(x)
        k, v = self.self_attn.keys_values(h, pos)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        x = self.res1.add(x, self.self_attn(h, k, v, self_mask, pos))
        h = self.res2.input(x)
        if record is not None:
            record.append(self.cross_attn.weights(h, memory_kv[0], cross_mask))
        x = self.res2.add(x, self.cross_attn(h, *memory_kv, cross_mask))
        return self.res3.add(x, self.ff(self.res3.input(x)))


def lp(length: int, alpha: float) -> float:
    """GNMT's lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016); a beam's score is log p / lp(len)."""
    return ((5 + length) / 6) ** alpha


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, spec: PairSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        C, shared = cfg.n_embd, cfg.share_embeddings and spec.shared
        if shared and spec.src_vocab_size != spec.tgt_vocab_size:
            raise ValueError(f"a shared vocabulary has one size, not {spec.src_vocab_size} and {spec.tgt_vocab_size}")
        self.tgt_tok = nn.Embedding(spec.tgt_vocab_size, C)  # also the output layer
        self.src_tok = None if shared else nn.Embedding(spec.src_vocab_size, C)  # None: the target's table
        learned = cfg.positions == "learned"
        self.src_pos = nn.Embedding(spec.max_len, C) if learned else None
        self.tgt_pos = nn.Embedding(spec.max_len, C) if learned else None
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        pre = cfg.norm == "pre"  # post-norm layers end in a LayerNorm already
        self.ln_enc = nn.LayerNorm(C) if pre else nn.Identity()
        self.ln_dec = nn.LayerNorm(C) if pre else nn.Identity()
        self.apply(gpt2_init)

    def embed(self, ids: Tensor, pos: Tensor, tok: nn.Embedding, table: nn.Embedding | None) -> Tensor:
        """(B, T) ids at positions `pos` (T,) -> (B, T, C), dropout applied."""
        return self.drop(add_positions(tok(ids), pos, self.cfg, table))

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """The memory (B, S, C) of source ids `src` (B, S); `src_mask` (B, S) is True on real tokens."""
        pos = torch.arange(src.shape[1], device=src.device)  # (S,)
        x = self.embed(src, pos, self.src_tok if self.src_tok is not None else self.tgt_tok, self.src_pos)
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S): every query attends to the real keys
        for layer in self.encoder:
            x = layer(x, mask, pos)
        return self.ln_enc(x)

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's cross-attention keys and values of `memory`."""
        return [layer.cross_attn.keys_values(memory) for layer in self.decoder]

    def _decoder(self, tgt: Tensor, self_mask: Tensor | None, memory_kv: list[tuple[Tensor, Tensor]],
                 src_mask: Tensor, cache: Cache | None = None, record: list[Tensor] | None = None) -> Tensor:
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + tgt.shape[1], device=tgt.device)  # (T,)
        x = self.embed(tgt, pos, self.tgt_tok, self.tgt_pos)  # (B, T, C)
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, layer in enumerate(self.decoder):
            x = layer(x, self_mask, memory_kv[i], cross_mask, pos, cache, i, record)
        if cache is not None:
            cache.length += tgt.shape[1]
        return F.linear(self.ln_dec(x), self.tgt_tok.weight)  # (B, T, V)

    @staticmethod
    def self_mask(tgt: Tensor, tgt_mask: Tensor | None) -> Tensor:
        """(B, 1, T, T): position t attends to the real positions <= t, and always to itself, so that a padded
        query row is never all masked (that would give NaN); a real position never sees padding either way."""
        T = tgt.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).tril()  # (T, T)
        if tgt_mask is None:
            return causal[None, None]
        keys = tgt_mask[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=tgt.device)  # (B, 1, T, T)
        return causal & keys

    def decode(self, memory: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of the next target token after each of the decoder inputs `tgt` (B, T);
        `tgt_mask` None: every target token is real."""
        return self._decoder(tgt, self.self_mask(tgt, tgt_mask), self.memory_kv(memory), src_mask)

    def forward(self, src: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> Tensor:
        """Logits (B, T, V) of the next target token at each position of the decoder input `tgt` (B, T)
        (BOS w1 ...), given the source `src` (B, S); the masks are True on real tokens."""
        return self.decode(self.encode(src, src_mask), src_mask, tgt, tgt_mask)

    @torch.no_grad()
    def cross_attention(self, src: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> list[Tensor]:
        """Every decoder layer's cross-attention weights, (B, nh, T, S) each: each row sums to 1 over the real
        source tokens and is 0 on padding (for an attention-map plot of a translated sentence)."""
        weights: list[Tensor] = []
        memory = self.encode(src, src_mask)
        self._decoder(tgt, self.self_mask(tgt, tgt_mask), self.memory_kv(memory), src_mask, record=weights)
        return weights

    def _max_len(self, max_len: int | None) -> int:
        max_len = self.spec.max_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, not {max_len}")
        return max_len

    def _allowed(self, scores: Tensor) -> Tensor:
        """Scores (N, V) with PAD and BOS ruled out: a translation never contains them."""
        scores = scores.clone()
        scores[:, [self.spec.pad_id, self.spec.bos_id]] = float("-inf")
        return scores

    @torch.no_grad()
    def greedy(self, src: Tensor, src_mask: Tensor, max_len: int | None = None) -> list[list[int]]:
        """The likeliest next token at each step, for each sentence of `src` (B, S): one token list per sentence,
        without BOS and EOS, at most `max_len` (default spec.max_len) tokens long."""
        max_len, eos = self._max_len(max_len), self.spec.eos_id
        cache = Cache(self.memory_kv(self.encode(src, src_mask)))
        tok = torch.full((len(src), 1), self.spec.bos_id, dtype=torch.long, device=src.device)  # (B, 1)
        out, done = [], torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            tok = self._allowed(self._decoder(tok, None, cache.memory_kv, src_mask, cache)[:, -1]).argmax(-1)[:, None]
            out.append(tok)
            done |= tok[:, 0] == eos
            if done.all():
                break
        seqs = torch.cat(out, dim=1).tolist()  # (B, steps)
        return [s[:s.index(eos)] if eos in s else s for s in seqs]

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_mask: Tensor, beam: int = 5, max_len: int | None = None,
                    length_penalty: float = 1.0) -> list[list[int]]:
        """The best hypothesis of a `beam`-wide search for each sentence of `src` (B, S), without BOS and EOS.

        A hypothesis scores log p / lp(len) (`length_penalty` is GNMT's alpha; len counts its tokens with EOS).
        Each step extends the live beams by every token and keeps the best 2 x beam extensions: those ending in
        EOS among the best `beam` finish, and the best `beam` others live on (fairseq's scheme, so that beam=1 is
        greedy). A sentence is done when `beam` hypotheses have finished; at `max_len` tokens the best `beam`
        extensions finish as they are, with or without EOS."""
        return self.scored_beam_search(src, src_mask, beam, max_len, length_penalty)[0]

    @torch.no_grad()
    def scored_beam_search(self, src: Tensor, src_mask: Tensor, beam: int = 5, max_len: int | None = None,
                           length_penalty: float = 1.0) -> tuple[list[list[int]], Tensor]:
        """`beam_search`'s hypotheses and their scores (B,), log p / lp(len)."""
        max_len, K, eos = self._max_len(max_len), beam, self.spec.eos_id
        if K < 1:
            raise ValueError(f"beam must be >= 1, not {K}")
        B, dev = len(src), src.device
        memory = self.encode(src, src_mask).repeat_interleave(K, dim=0)  # (B*K, S, C): row b*K + j is beam j of b
        src_mask = src_mask.repeat_interleave(K, dim=0)  # (B*K, S)
        cache = Cache(self.memory_kv(memory))
        tok = torch.full((B * K, 1), self.spec.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((B, K), float("-inf"), device=dev)  # log p of each live beam
        scores[:, 0] = 0.0  # one live beam at the start: the others would only repeat it
        seqs = torch.zeros(B, K, 0, dtype=torch.long, device=dev)  # the live beams' tokens so far
        best = torch.full((B,), float("-inf"), device=dev)  # the best finished hypothesis: its score,
        best_seq = torch.zeros(B, max_len, dtype=torch.long, device=dev)  # tokens
        best_len = torch.zeros(B, dtype=torch.long, device=dev)  # and length without EOS
        n_finished = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)
        for t in range(max_len):  # choose the (t+1)-th token
            logits = self._decoder(tok, None, cache.memory_kv, src_mask, cache)[:, -1]  # (B*K, V)
            logp = self._allowed(logits.float().log_softmax(dim=-1))
            V = logp.shape[-1]
            top, idx = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V).topk(2 * K, dim=1)  # (B, 2K)
            parent, token = idx // V, idx % V
            cand = torch.cat([seqs.gather(1, parent[..., None].expand(-1, -1, t)), token[..., None]], dim=2)
            last = t == max_len - 1
            finish = ((token == eos) | last) & (torch.arange(2 * K, device=dev) < K) & top.isfinite() & ~done[:, None]
            norm = (top / lp(t + 1, length_penalty)).masked_fill(~finish, float("-inf"))
            value, r = norm.max(dim=1)  # (B,): the best hypothesis finishing now
            better = value > best
            best = torch.where(better, value, best)
            best_seq[better, :t + 1] = cand[rows, r][better]
            best_len = torch.where(better, t + 1 - (token[rows, r] == eos).long(), best_len)
            n_finished += finish.sum(dim=1)
            if last:
                break
            live = (token == eos).int().argsort(dim=1, stable=True)[:, :K]  # (B, K): the best K not ending in EOS
            scores, parent, seqs = top.gather(1, live), parent.gather(1, live), cand[rows[:, None], live]
            done |= n_finished >= K
            if done.all():
                break
            cache.select((rows[:, None] * K + parent).view(-1))
            tok = token.gather(1, live).view(-1, 1)
        return [best_seq[b, :best_len[b]].tolist() for b in range(B)], best


EXAMPLE = PairSpec(src_vocab_size=23, tgt_vocab_size=19, max_len=16)


def _transformer(cfg: TransformerConfig, spec: PairSpec) -> Seq2SeqTransformer:
    """Encoder-decoder Transformer (Vaswani et al. 2017; pre- or post-norm) for translation."""
    return Seq2SeqTransformer(cfg, spec)


models.register("transformer", config=TransformerConfig, example=EXAMPLE)(_transformer)
