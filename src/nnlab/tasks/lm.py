"""Language modelling: next-token cross-entropy on windows of a token stream, perplexity and bits per
character, text samples at every evaluation, and `nnlab generate` (streamed, with the model's KV-cache).

    nnlab train shakespeare-char
    nnlab generate RUN --prompt "ROMEO:" --max-new-tokens 500 --temperature 0.8 --top-k 200 --top-p 0.95 --seed 1

Prompts: an empty prompt starts from a newline (the corpora's line separator stands in for a BOS token);
characters a char vocabulary lacks are named on stderr and dropped. A generation longer than the model's
context slides (see models/gpt.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import run as R
from ..config import check
from ..data import Batch
from ..errors import UserError
from ..registry import commands
from . import TaskBase, tasks

SAMPLES = "samples"  # run-folder subfolder: the text sampled at each evaluation


@dataclass
class LMConfig:
    name: str = "lm"
    samples: int = 1  # texts sampled at every evaluation into <run>/samples/ (0: none)
    sample_tokens: int = 200  # tokens per sample
    prompt: str = "\n"  # what the samples start from
    temperature: float = 0.8  # sampling temperature of the samples (<= 0: greedy)
    top_k: int = 200  # sample among the k likeliest tokens (0: all)

    def __post_init__(self) -> None:
        check(self.samples >= 0 and self.sample_tokens >= 1, "task.samples", "samples >= 0, sample_tokens >= 1")
        check(self.top_k >= 0, "task.top_k", "must be >= 0 (0: no top-k)")


class LanguageModel(TaskBase):
    monitor = "loss"

    def __init__(self, cfg: LMConfig, spec):
        self.cfg, self.spec = cfg, spec

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch["x"])  # (B, T, V)
        return {"loss": F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())}

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        logits = model(batch["x"]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum")
        return {"loss_sum": loss.double(), "tokens": torch.tensor(batch["y"].numel(), device=loss.device)}

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        loss = stats["loss_sum"].item() / max(int(stats["tokens"]), 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
                "bpc": loss / math.log(2) / self.spec.chars_per_token}

    # --- text in, text out ----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, device: torch.device) -> tuple[Tensor, str]:
        """(1, T) ids of `prompt` (an empty one: a newline), and the characters dropped from it."""
        ids, unknown = self.spec.tok.encode(prompt or "\n")
        if len(ids) == 0:  # nothing encodable left
            ids, _ = self.spec.tok.encode("\n")
        return torch.as_tensor(ids, dtype=torch.long, device=device)[None], unknown

    def stream(self, model: nn.Module, prompt: str, max_new_tokens: int, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, use_cache: bool = True
               ) -> Iterator[str]:
        """The text after `prompt`, piece by piece as tokens are sampled (a piece holds no broken UTF-8).
        Bad settings fail here, before anything is generated."""
        check_sampling(max_new_tokens, top_k, top_p, self.spec.vocab_size)
        device = next(model.parameters()).device
        idx, unknown = self.prompt_ids(prompt, device)
        if unknown:
            print(f"warning: the vocabulary lacks {unknown!r}: dropped from the prompt", file=sys.stderr)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        return self._pieces(model.eval().generate(idx, max_new_tokens, temperature, top_k, top_p, gen, use_cache))

    def _pieces(self, tokens: Iterator[Tensor]) -> Iterator[str]:
        out: list[int] = []
        shown = ""
        for tok in tokens:
            out.append(int(tok[0]))
            text = self.spec.tok.decode(out)
            if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a multi-byte character's end
                yield text[len(shown):]
                shown = text
        text = self.spec.tok.decode(out)
        if len(text) > len(shown):
            yield text[len(shown):]

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        """The continuation of each text (the task's sampling settings, seed 0)."""
        c = self.cfg
        return [{"text": "".join(self.stream(model, p, c.sample_tokens, c.temperature, c.top_k, seed=0))}
                for p in inputs]

    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        """`samples` texts from the current weights into samples/step-NNNNNN.txt."""
        c = self.cfg
        if not c.samples:
            return
        texts = ["".join(self.stream(model, c.prompt, c.sample_tokens, c.temperature, c.top_k, seed=i))
                 for i in range(c.samples)]
        (folder / SAMPLES).mkdir(exist_ok=True)
        R.atomic_write(folder / SAMPLES / f"step-{step:06d}.txt",
                       "\n\n".join(f"--- sample {i} ---\n{c.prompt}{t}" for i, t in enumerate(texts)) + "\n")

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        spec = self.spec
        lines = ["", "## Language model", "", f"- corpus: {spec.corpus}",
                 f"- tokenizer: {spec.tokenizer}, {spec.vocab_size} tokens; {spec.chars_per_token:.3f} characters "
                 f"per token (val); context {spec.block_size}"]
        if summary.get("samples_per_s"):
            lines.append(f"- training: {summary['samples_per_s'] * spec.block_size:,.0f} tokens/s"
                         + (f", MFU {summary['mfu']:.1%} of this machine's measured matmul peak"
                            if summary.get("mfu") else ""))
        final = summary.get("final", {})
        for split in ("val", "test"):
            if f"{split}/loss" in final:
                lines.append(f"- {split}: loss {final[f'{split}/loss']:.4f} nats/token, perplexity "
                             f"{final[f'{split}/ppl']:.2f}, {final[f'{split}/bpc']:.4f} bits/character")
        files = sorted((folder / SAMPLES).glob("step-*.txt"))
        if files:
            lines += ["", f"### Samples (last of {len(files)} evaluations: {SAMPLES}/{files[-1].name})", "",
                      "```", files[-1].read_text().rstrip()[:3000], "```"]
        return lines


def check_sampling(max_new_tokens: int, top_k: int, top_p: float, vocab: int) -> None:
    """Sampling settings a person may get wrong; a top-k of the vocabulary's size or more keeps every token."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 or at least the vocabulary's {vocab} tokens: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1: off), got {top_p}")


@tasks.register("lm", config=LMConfig)
def lm(cfg: LMConfig, spec) -> LanguageModel:
    """Next-token language modelling (loss, perplexity, bits per character, samples)."""
    return LanguageModel(cfg, spec)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="", help="text to continue (default: empty, which starts a new line)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; <= 0 is greedy (0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0: all (200)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of probability "
                   ">= p; 1: off (1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each time)")
    p.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


@commands.register("generate", arguments=_generate_args, tasks=("lm",))
def generate(loaded: Any, args: argparse.Namespace) -> int:
    """Sample text from a language-model run, streamed to the terminal."""
    t0, parts = time.perf_counter(), []
    stream = loaded.task.stream(loaded.model, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                args.top_p, args.seed, not args.no_cache)
    if not args.json:
        sys.stdout.write(args.prompt)
    for piece in stream:
        parts.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": "".join(parts), "tokens": args.max_new_tokens,
                          "tokens_per_s": round(args.max_new_tokens / dt, 1)}))
    else:
        print(f"\n[{args.max_new_tokens} tokens in {dt:.2f} s: {args.max_new_tokens / dt:.0f} tokens/s]",
              file=sys.stderr)
    return 0
