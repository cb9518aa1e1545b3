"""GPT: a decoder-only Transformer language model (Radford et al. 2018/2019), in nanoGPT's layout.

Token embedding (+ learned positions, or rotary positions in attention, Su et al. 2021) -> `n_layer` pre-norm
blocks (causal self-attention by `scaled_dot_product_attention`, then a 4x GELU MLP) -> final LayerNorm -> logits
by the token embedding itself (weight tying, Press & Wolf 2017). `generate` samples with a KV-cache: the prompt
is run once, then each new token attends to the cached keys and values of all before it.

The context is the data's `block_size`. When a generation fills it, the cache restarts from the last half of
the context (one batched forward, so the cost per token stays about that of a cached step); tokens then see
between half and all of a context's worth of history, never more than the model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..data.text import TokenSpec
from . import attend, gpt2_init, models


@dataclass
class GPTConfig:
    name: str = "gpt"
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention heads per block (n_embd must divide by it)
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # on attention weights, residual branches and embeddings (training only)
    bias: bool = False  # biases in Linear and LayerNorm layers (nanoGPT's baby GPT has none)
    positions: str = "learned"  # learned (absolute embeddings) | rotary (RoPE on queries and keys)
    tie_weights: bool = True  # the output layer is the token embedding (fewer parameters, as GPT-2)

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd"):
            check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        check(self.n_embd % self.n_head == 0, "model.n_embd", f"must be divisible by model.n_head={self.n_head}")
        check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        check(self.positions in ("learned", "rotary"), "model.positions", "must be learned or rotary")
        check(self.positions == "learned" or (self.n_embd // self.n_head) % 2 == 0, "model.n_embd",
              "rotary positions need an even head size (n_embd / n_head)")


def rotate(x: Tensor, pos: Tensor) -> Tensor:
    """Rotary position embedding of (B, nh, T, hs) at positions `pos` (T,): pairs (x_i, x_{i+hs/2}) are
    rotated by pos * 10000^(-2i/hs) (the GPT-NeoX / Llama half-split layout)."""
    hs = x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    angle = pos.float()[:, None] * freq[None, :]  # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :hs // 2], x[..., hs // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class KVCache:
    """Preallocated keys and values of every layer, (B, nh, block, hs) each, filled up to `length`."""

    def __init__(self, n_layer: int, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype):
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.rotary, self.dropout = cfg.n_head, cfg.positions == "rotary", cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, pos: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.rotary:
            q, k = rotate(q, pos), rotate(k, pos)
        causal = True
        if cache is not None:  # write this step's keys/values, attend to everything cached so far
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            causal = start == 0  # a prompt attends causally; one new token attends to all before it
            if start and T > 1:
                raise ValueError("a cached forward after the prompt takes one token at a time")
        y = attend(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal)  # (B, nh, T, hs)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor, pos: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln1(x), pos, cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, vocab_size: int, block_size: int):
        super().__init__()
        self.cfg, self.vocab_size, self.block_size = cfg, vocab_size, block_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(block_size, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = None if cfg.tie_weights else nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.apply(gpt2_init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, vocab) of the next token after each of the ids `x` (B, T); with a cache, `x`
        continues the cached sequence (positions go on from `cache.length`)."""
        B, T = x.shape
        start = cache.length if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"a sequence of {start + T} tokens exceeds the context of {self.block_size}")
        pos = torch.arange(start, start + T, device=x.device)  # (T,)
        x = self.wte(x)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        return self.head(x) if self.head is not None else F.linear(x, self.wte.weight)

    def param_groups(self) -> list[dict]:
        """The blocks' matrices (Muon's, when the optimizer is muon), the other matrices (the embeddings, with
        weight decay, as nanoGPT), and the norm gains and biases (no decay)."""
        hidden = [p for p in self.blocks.parameters() if p.ndim == 2]
        ids = {id(p) for p in hidden}
        return [{"params": hidden, "optimizer": "muon"},
                {"params": [p for p in self.parameters() if p.ndim == 2 and id(p) not in ids], "decay": True},
                {"params": [p for p in self.parameters() if p.ndim < 2], "decay": False}]

    def flops_per_sample(self) -> float:
        """Training FLOPs of one window of `block_size` tokens: 6 per parameter per token (forward and
        backward of every matmul) plus attention's 12 * n_layer * n_embd * T per token (Kaplan et al. 2020;
        PaLM's MFU appendix; nanoGPT's `estimate_mfu`). Position embeddings are lookups, not counted."""
        n = sum(p.numel() for p in self.parameters()) - (self.wpe.weight.numel() if self.wpe is not None else 0)
        T = self.block_size
        return (6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * T) * T

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True
                 ) -> Iterator[Tensor]:
        """Yield `max_new_tokens` next tokens (B,) one at a time after the prompt `idx` (B, T >= 1).
        temperature <= 0 is greedy; `top_k` > 0 keeps the k likeliest; `top_p` < 1 keeps the smallest set whose
        probability reaches p (nucleus sampling, Holtzman et al. 2020). `use_cache=False` reruns the last
        context window for every token (the reference the cached path is tested against)."""
        keep = self.block_size // 2 or 1  # context kept when a cached generation fills the window
        seq = idx[:, -self.block_size:]
        cache, logits = None, None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(seq[:, -self.block_size:])[:, -1]
            elif cache is None or cache.length == self.block_size:  # (re)start: run the context once
                p = next(self.parameters())
                hs = self.cfg.n_embd // self.cfg.n_head
                cache = KVCache(self.cfg.n_layer, (len(seq), self.cfg.n_head, self.block_size, hs), p.device,
                                torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type)
                                else p.dtype)
                seq = seq[:, -(keep if logits is not None else self.block_size):]
                logits = self(seq, cache)[:, -1]
            else:
                logits = self(seq[:, -1:], cache)[:, -1]
            nxt = sample(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            yield nxt


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
           ) -> Tensor:
    """One token per row of `logits` (B, V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs > top_p  # tokens after the nucleus (the first one always stays)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _gpt(cfg: GPTConfig, spec: TokenSpec) -> GPT:
    """GPT decoder language model (nanoGPT layout; learned or rotary positions, tied embeddings)."""
    return GPT(cfg, spec.vocab_size, spec.block_size)


EXAMPLE = TokenSpec(vocab_size=65, block_size=16)
models.register("gpt", config=GPTConfig, example=EXAMPLE)(_gpt)
