"""Generation speed: tokens/s at batch 1, with nnlab's KV-cache and without it (the whole context rerun per
token, as nanoGPT's `generate` does), for a recipe's GPT. Speed does not depend on the weights, so the model is
freshly initialised; the prompt is one token and the generation runs past the context (so the cached path
restarts from half the context as it slides).

    .venv/bin/python benchmarks/generate.py                     # shakespeare-char's model, 500 tokens
    .venv/bin/python benchmarks/generate.py gpt-pystdlib --tokens 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402

from nnlab.config import load_config  # noqa: E402
from nnlab.data.text import TokenSpec  # noqa: E402
from nnlab.models import build  # noqa: E402


def rate(model, tokens: int, use_cache: bool) -> float:
    idx = torch.zeros(1, 1, dtype=torch.long)
    list(model.generate(idx, 20, temperature=1.0, top_k=200, use_cache=use_cache))  # warm-up
    t0 = time.perf_counter()
    for _ in model.generate(idx, tokens, temperature=1.0, top_k=200, use_cache=use_cache):
        pass
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="shakespeare-char")
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: shakespeare-char)")
    args = p.parse_args()
    print(line(measure()), flush=True)
    cfg = load_config(args.recipe)
    spec = TokenSpec(vocab_size=args.vocab, block_size=cfg.data.block_size)
    torch.manual_seed(0)
    model = build(cfg.model.name, cfg.model, spec).eval()
    params = sum(p.numel() for p in model.parameters())
    cached, plain = rate(model, args.tokens, True), rate(model, args.tokens, False)
    print(f"{args.recipe}: {params:,} parameters, context {spec.block_size}, batch 1, {args.tokens} new tokens: "
          f"KV-cache {cached:.0f} tokens/s, uncached {plain:.0f} tokens/s (x{cached / plain:.2f})")


if __name__ == "__main__":
    main()
