"""The encoder-decoder Transformer: shapes, padding invariance, causality, the explicit cross-attention weights
against the SDPA path, cached decoding against the uncached forward, and beam search against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nnlab.config import section_from_dict
from nnlab.data.text import PairSpec
from nnlab.errors import UserError
from nnlab.models import build, models
from nnlab.models.transformer import Cache, Seq2SeqTransformer, TransformerConfig, lp, sinusoids

LAYOUTS = [(n, p) for n in ("pre", "post") for p in ("sinusoidal", "learned", "rotary")]


def transformer(norm: str = "pre", positions: str = "sinusoidal", tgt_vocab: int = 12, src_vocab: int = 11,
                shared: bool = False, std: float = 0.02, seed: int = 0) -> Seq2SeqTransformer:
    """A tiny model in eval mode; a larger `std` re-draws the weights for peaked (less uniform) predictions."""
    torch.manual_seed(seed)
    spec = PairSpec(src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, max_len=12, shared=shared)
    model = Seq2SeqTransformer(TransformerConfig(n_layer=2, n_head=2, n_embd=16, norm=norm, positions=positions),
                               spec).eval()
    if std != 0.02:
        for p in model.parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=std)
    return model


def batch(model: Seq2SeqTransformer, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    b = model.spec.example(n)
    return b["src"], b["src_mask"], b["tgt"], b["tgt_mask"]


def pad(ids: torch.Tensor, mask: torch.Tensor, extra: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=False)


def test_registered_forward_backward() -> None:
    spec = models["transformer"].meta["example"]
    model = build("transformer", section_from_dict(models, {"name": "transformer", "n_embd": 32, "n_layer": 1}),
                  spec)
    b = spec.example(4)
    logits = model(b["src"], b["src_mask"], b["tgt"], b["tgt_mask"])  # train mode: dropout on
    assert logits.shape == (*b["tgt"].shape, spec.tgt_vocab_size) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.encode(b["src"], b["src_mask"]).shape == (*b["src"].shape, 32)


@pytest.mark.parametrize("norm,positions", LAYOUTS)
def test_extra_padding_changes_nothing(norm: str, positions: str) -> None:
    model = transformer(norm, positions)
    src, sm, tgt, tm = batch(model)
    src[~sm] = 5  # what lies under the mask must not matter either
    with torch.no_grad():
        ref = model(src, sm, tgt, tm)  # (B, T, V)
        out = model(*pad(src, sm, 3), *pad(tgt, tm, 2))
    assert torch.isfinite(out).all()  # padded query rows included
    assert torch.allclose(out[:, :tgt.shape[1]][tm], ref[tm], atol=1e-5)
    tm[0] = False  # even a target of padding only gives no NaN: every query may attend to itself
    assert model.self_mask(tgt, tm).any(-1).all()
    with torch.no_grad():
        assert torch.isfinite(model(src, sm, tgt, tm)).all()


def test_sinusoids_and_source_order() -> None:
    """The paper's PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...); and, through the positions, the
    source's word order matters (without them the encoder-decoder would see a bag of words)."""
    pe = sinusoids(torch.arange(7), 6)
    p, i = 5, 2
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)), abs=1e-6)
    for positions in ("sinusoidal", "learned", "rotary"):
        model = transformer(positions=positions, std=0.3)
        src, sm, tgt, tm = batch(model)
        swapped = src.clone()
        swapped[:, [1, 2]] = src[:, [2, 1]]
        with torch.no_grad():
            assert not torch.allclose(model(src, sm, tgt, tm), model(swapped, sm, tgt, tm), atol=1e-4)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_is_causal(norm: str) -> None:
    model = transformer(norm)
    src, sm, tgt, tm = batch(model)
    tm[:] = True
    changed = tgt.clone()
    changed[:, 4] = (tgt[:, 4] + 1 - 3) % (model.spec.tgt_vocab_size - 3) + 3
    with torch.no_grad():
        a, b = model(src, sm, tgt, tm), model(src, sm, changed, tm)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-4)


@pytest.mark.parametrize("norm,positions", LAYOUTS)
def test_cross_attention_weights_are_what_sdpa_applies(norm: str, positions: str) -> None:
    model = transformer(norm, positions, std=0.3)
    src, sm, tgt, tm = batch(model)
    calls = []  # each decoder layer's cross-attention inputs and output, as the SDPA path computed them
    hooks = [layer.cross_attn.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
             for layer in model.decoder]
    weights = model.cross_attention(src, sm, tgt, tm)
    for h in hooks:
        h.remove()
    (B, S), T = src.shape, tgt.shape[1]
    assert len(weights) == len(calls) == 2
    for w, (attn, (_, _, v, _), out) in zip(weights, calls, strict=True):
        assert w.shape == (B, 2, T, S)
        assert torch.allclose(w.sum(-1), torch.ones(B, 2, T), atol=1e-5)
        assert (w.masked_select(~sm[:, None, None, :]) == 0).all()
        y = (w @ v).transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        assert torch.allclose(attn.proj(y), out, atol=1e-5)
    assert not torch.allclose(weights[0], weights[0].mean(-1, keepdim=True).expand_as(weights[0]), atol=1e-3)


@pytest.mark.parametrize("norm,positions", LAYOUTS)
def test_cached_steps_equal_the_full_decode(norm: str, positions: str) -> None:
    model = transformer(norm, positions)
    src, sm, tgt, _ = batch(model)
    with torch.no_grad():
        memory = model.encode(src, sm)
        full = model.decode(memory, sm, tgt)  # (B, T, V)
        cache = Cache(model.memory_kv(memory))
        steps = [model._decoder(tgt[:, t:t + 1], None, cache.memory_kv, sm, cache) for t in range(tgt.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def reference_greedy(model: Seq2SeqTransformer, src: torch.Tensor, sm: torch.Tensor, max_len: int
                     ) -> list[list[int]]:
    """Step-by-step argmax of the uncached `forward`, PAD and BOS excluded."""
    spec = model.spec
    tgt = torch.full((len(src), 1), spec.bos_id)
    for _ in range(max_len):
        logits = model(src, sm, tgt, torch.ones_like(tgt, dtype=torch.bool))[:, -1]
        logits[:, [spec.pad_id, spec.bos_id]] = float("-inf")
        tgt = torch.cat([tgt, logits.argmax(-1, keepdim=True)], 1)
    seqs = tgt[:, 1:].tolist()
    return [s[:s.index(spec.eos_id)] if spec.eos_id in s else s for s in seqs]


@pytest.mark.parametrize("norm,positions", LAYOUTS)
def test_greedy_is_the_stepwise_argmax_and_beam_one(norm: str, positions: str) -> None:
    model = transformer(norm, positions, tgt_vocab=6, std=0.3, seed=8)
    src, sm, _, _ = batch(model, n=8)
    with torch.no_grad():
        ref = reference_greedy(model, src, sm, 9)
    out = model.greedy(src, sm, max_len=9)
    assert out == ref
    assert any(len(s) < 9 for s in out)  # some stopped at EOS (with this seed)
    assert all(t not in (0, 1, 2) for s in out for t in s)
    for alpha in (0.0, 1.0):
        assert model.beam_search(src, sm, beam=1, max_len=9, length_penalty=alpha) == out
    assert model.greedy(src, sm) == reference_greedy(model, src, sm, model.spec.max_len)  # default max_len


def score(model: Seq2SeqTransformer, src: torch.Tensor, seq: list[int], alpha: float) -> float:
    """log p(seq | src) / lp(len(seq)) under the uncached forward; `seq` may end in EOS."""
    tgt = torch.tensor([[model.spec.bos_id, *seq[:-1]]])
    with torch.no_grad():
        logp = model(src[None], torch.ones(1, len(src), dtype=torch.bool), tgt, torch.ones_like(tgt, dtype=torch.bool)
                     ).log_softmax(-1)[0]  # (L, V)
    return logp[torch.arange(len(seq)), torch.tensor(seq)].sum().item() / lp(len(seq), alpha)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_beam_search_finds_the_brute_force_best(norm: str, alpha: float) -> None:
    """Two words (3, 4) and EOS, max_len 4: 15 hypotheses ending in EOS and 16 that hit max_len. A beam of 32
    prunes nothing, so it must return the best of all 31, with its score, by exactly beam search's definition;
    a batch of sentences of different lengths (padded) goes through at once."""
    model = transformer(norm, tgt_vocab=5, std=0.3, seed=1)
    src, sm, _, _ = batch(model, n=6, seed=4)
    eos, max_len = model.spec.eos_id, 4
    hyps = [[*w, eos] for n in range(max_len) for w in itertools.product((3, 4), repeat=n)]
    hyps += [list(w) for w in itertools.product((3, 4), repeat=max_len)]
    assert len(hyps) == 31
    out, got = model.scored_beam_search(src, sm, beam=32, max_len=max_len, length_penalty=alpha)
    assert model.beam_search(src, sm, beam=32, max_len=max_len, length_penalty=alpha) == out
    for i in range(len(src)):
        real = src[i][sm[i]]
        scores = [score(model, real, h, alpha) for h in hyps]
        best = max(range(len(hyps)), key=scores.__getitem__)
        assert out[i] == [t for t in hyps[best] if t != eos], (i, scores)
        assert got[i].item() == pytest.approx(scores[best], abs=1e-5)
    assert out != model.greedy(src, sm, max_len=max_len)  # better than greedy somewhere (with this seed)
    assert model.beam_search(src, sm, beam=3, max_len=max_len, length_penalty=alpha)[:2] == \
        [model.beam_search(src[i:i + 1, :int(sm[i].sum())], sm[i:i + 1, :int(sm[i].sum())], beam=3,
                           max_len=max_len, length_penalty=alpha)[0] for i in range(2)]  # batched = one by one


def test_length_penalty_prefers_longer_hypotheses() -> None:
    model = transformer(tgt_vocab=6, std=0.5, seed=2)
    src, sm, _, _ = batch(model, n=8)
    short = model.beam_search(src, sm, beam=4, max_len=8, length_penalty=0.0)
    long = model.beam_search(src, sm, beam=4, max_len=8, length_penalty=2.0)
    assert sum(map(len, long)) >= sum(map(len, short))


def test_shared_embeddings() -> None:
    shared = transformer(tgt_vocab=12, src_vocab=12, shared=True)
    separate = transformer(tgt_vocab=12, src_vocab=12, shared=False)
    assert shared.src_tok is None and separate.src_tok is not None
    n = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
    assert n == 12 * 16
    assert len(shared.state_dict()) == len(dict(shared.named_parameters())) + len(dict(shared.named_buffers()))
    src, sm, tgt, tm = batch(shared)
    assert torch.isfinite(shared(src, sm, tgt, tm)).all()
    with pytest.raises(ValueError, match="one size"):
        transformer(tgt_vocab=12, src_vocab=11, shared=True)


def test_learned_positions_bound_the_length() -> None:
    model = transformer(positions="learned")
    src, sm, _, _ = batch(model)
    assert all(len(s) <= 3 for s in model.greedy(src, sm, max_len=3))
    with pytest.raises(ValueError, match="learned positions"):
        model.greedy(src, sm, max_len=13)
    assert len(transformer().greedy(src, sm, max_len=13)) == 3  # sinusoids extend past max_len


@pytest.mark.parametrize("override,key", [({"n_embd": 30, "n_head": 4}, "model.n_embd"),
                                          ({"norm": "mid"}, "model.norm"),
                                          ({"positions": "alibi"}, "model.positions"),
                                          ({"positions": "rotary", "n_embd": 12, "n_head": 4}, "model.n_embd"),
                                          ({"dropout": 1.0}, "model.dropout"),
                                          ({"n_layer": 0}, "model.n_layer"),
                                          ({"ff_mult": 0}, "model.ff_mult"),
                                          ({"n_embd": 9, "n_head": 3}, "model.n_embd")])
def test_bad_config_values(override: dict, key: str) -> None:
    with pytest.raises(UserError, match=f"'{key}'"):
        TransformerConfig(**override)
