"""Sequence to sequence (translation): teacher-forced, label-smoothed cross-entropy on the target tokens,
token accuracy and perplexity during training, and at the final evaluation BLEU and chrF of decoded
translations (sacrebleu, detokenized: byte-level BPE decodes to the raw text, compared with the raw references).

    nnlab train multi30k-transformer
    nnlab translate RUN "Ein Mann fährt Fahrrad." --beam 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
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
from ..report import pyplot, save_figure
from . import TaskBase, tasks
from .lm import SAMPLES


@dataclass
class Seq2SeqConfig:
    name: str = "seq2seq"
    label_smoothing: float = 0.1  # on the target tokens (the 2017 paper's 0.1)
    beam: int = 5  # beam width of the final evaluation and `predict` (1: greedy)
    length_penalty: float = 1.0  # GNMT's alpha: scores are divided by ((5 + length) / 6) ** alpha
    samples: int = 5  # val sentences translated (greedy) into <run>/samples/ at every evaluation (0: none)

    def __post_init__(self) -> None:
        check(0 <= self.label_smoothing < 1, "task.label_smoothing", "must be in [0, 1)")
        check(self.beam >= 1, "task.beam", "must be >= 1 (1: greedy)")
        check(self.length_penalty >= 0, "task.length_penalty", "must be >= 0")
        check(self.samples >= 0, "task.samples", "must be >= 0")


class Seq2Seq(TaskBase):
    monitor = "loss"

    def __init__(self, cfg: Seq2SeqConfig, spec):
        self.cfg, self.spec = cfg, spec

    def logits(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """Teacher forcing: the logits (B*(T-1), V) after each target prefix and the next tokens (B*(T-1),),
        -100 (cross-entropy's ignore_index) after the end. Flat and unmasked: gathering the real positions
        would cost a scatter of the whole logit tensor in the backward pass."""
        tgt, mask = batch["tgt"], batch["tgt_mask"]
        out = model(batch["src"], batch["src_mask"], tgt[:, :-1], mask[:, :-1]).float()
        return out.flatten(0, 1), tgt[:, 1:].masked_fill(~mask[:, 1:], -100).flatten()

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits, y = self.logits(model, batch)
        return {"loss": F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)}

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor | list]:
        logits, y = self.logits(model, batch)
        stats: dict[str, Tensor | list] = {"loss_sum": F.cross_entropy(logits, y, reduction="sum").double(),
                                           "correct": (logits.argmax(-1) == y).sum(), "tokens": (y >= 0).sum()}
        if final:  # BLEU needs decoded text: only at the final evaluation (decoding is the slow part)
            stats["hyp"] = self.translate(model, batch["src"], batch["src_mask"])
            stats["ref"] = [self.spec.text(row[m].tolist()) for row, m in zip(batch["tgt"], batch["tgt_mask"],
                                                                               strict=True)]
        return stats

    def metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        n = max(int(stats["tokens"]), 1)
        loss = stats["loss_sum"].item() / n
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": stats["correct"].item() / n}
        if stats.get("hyp"):
            import sacrebleu

            out["bleu"] = sacrebleu.corpus_bleu(stats["hyp"], [stats["ref"]]).score
            out["chrf"] = sacrebleu.corpus_chrf(stats["hyp"], [stats["ref"]]).score
        return out

    def higher_is_better(self, metric: str) -> bool:
        return metric in ("acc", "bleu", "chrf")

    def translate(self, model: nn.Module, src: Tensor, src_mask: Tensor, beam: int | None = None,
                  length_penalty: float | None = None) -> list[str]:
        beam = self.cfg.beam if beam is None else beam
        lp = self.cfg.length_penalty if length_penalty is None else length_penalty
        ids = model.greedy(src, src_mask) if beam == 1 else model.beam_search(src, src_mask, beam, length_penalty=lp)
        return [self.spec.text(t) for t in ids]

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1, beam: int | None = None,
                length_penalty: float | None = None) -> list[dict[str, Any]]:
        batch, errors = self.spec.encode(inputs)
        rows: list[dict[str, Any]] = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            device = next(model.parameters()).device
            batch = batch.to(device)
            lengths = batch["src_mask"].sum(1).tolist()
            good = [r for r in rows if "error" not in r]
            hyps = self.translate(model.eval(), batch["src"], batch["src_mask"], beam, length_penalty)
            for row, hyp, n in zip(good, hyps, lengths, strict=True):
                row["translation"] = hyp
                if n >= self.spec.max_len:
                    row["note"] = f"the sentence was cut to the model's limit of {self.spec.max_len} tokens"
        return rows

    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        """The first `samples` val sentences, greedily translated, beside their references."""
        if not self.cfg.samples or "val" not in getattr(data, "texts", {}):
            return
        src, ref = (side[:self.cfg.samples] for side in data.texts["val"])
        rows = self.predict(model, src, beam=1)
        (folder / SAMPLES).mkdir(exist_ok=True)
        R.atomic_write(folder / SAMPLES / f"step-{step:06d}.txt", "".join(
            f"src: {s}\nref: {r}\nhyp: {row.get('translation', row.get('error'))}\n\n"
            for s, r, row in zip(src, ref, rows, strict=True)))

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        final = summary.get("final", {})
        lines = ["", "## Translation", "", f"- {self.spec.src_lang} -> {self.spec.tgt_lang}; vocabulary "
                 f"{self.spec.src_vocab_size} / {self.spec.tgt_vocab_size} tokens"
                 f"{' (shared)' if self.spec.shared else ''}; beam {self.cfg.beam}, length penalty "
                 f"{self.cfg.length_penalty}"]
        for split in ("val", "test"):
            if f"{split}/bleu" in final:
                lines.append(f"- {split}: BLEU {final[f'{split}/bleu']:.2f}, chrF {final[f'{split}/chrf']:.2f} "
                             f"(sacrebleu, detokenized), token accuracy {final[f'{split}/acc']:.4f}")
        if model is not None and data is not None and "test" in getattr(data, "texts", {}):
            src = data.texts["test"][0][0]
            batch, _ = self.spec.encode([src])
            device = next(model.parameters()).device
            batch = batch.to(device)
            hyp = model.eval().greedy(batch["src"], batch["src_mask"])[0]
            tgt = torch.tensor([[self.spec.bos_id, *hyp]], device=device)
            weights = model.cross_attention(batch["src"], batch["src_mask"], tgt, tgt > -1)  # (all real)
            plot_attention(weights[-1][0].mean(0).cpu(), self.pieces(batch["src"][0].tolist(), "src"),
                           self.pieces(hyp, "tgt"), folder / R.PLOTS / "attention.png")
            lines += ["", "### Attention (last decoder layer, mean over heads)", "",
                      f"src: {src}", "", f"hyp: {self.spec.text(hyp)}", "", "![attention](plots/attention.png)"]
        return lines

    def pieces(self, ids: list[int], side: str) -> list[str]:
        """Each token as text (the model's view of the sentence), specials by name."""
        names = {self.spec.bos_id: "<s>", self.spec.eos_id: "</s>", self.spec.pad_id: "<pad>"}
        return [names.get(i) or self.spec.text([i], side) for i in ids]


def plot_attention(w: Tensor, src: list[str], tgt: list[str], path: Path) -> None:
    """Cross-attention weights (T, S): rows are target tokens as predicted from each prefix (<s> first)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.9 + 0.32 * len(src), 0.9 + 0.3 * len(tgt)))
    ax.imshow(w[:len(tgt) + 1, :len(src)].numpy(), cmap="viridis", vmin=0)
    ax.set_xticks(range(len(src)), src, rotation=70, fontsize=7)
    ax.set_yticks(range(len(tgt) + 1), ["<s>", *tgt][:w.shape[0]], fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("target prefix")
    save_figure(fig, path)


@tasks.register("seq2seq", config=Seq2SeqConfig)
def seq2seq(cfg: Seq2SeqConfig, spec) -> Seq2Seq:
    """Sequence to sequence (translation): label-smoothed cross-entropy; BLEU and chrF by decoding."""
    return Seq2Seq(cfg, spec)


def _translate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="*", help="sentences to translate ('-': one per line from standard input)")
    p.add_argument("--beam", type=int, default=None, help="beam width (default: the run's task.beam; 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha (default: the run's)")
    p.add_argument("--json", action="store_true", help="print JSON lines")


@commands.register("translate", arguments=_translate_args, tasks=("seq2seq",))
def translate(loaded: Any, args: argparse.Namespace) -> int:
    """Translate sentences with a sequence-to-sequence run (beam search or greedy)."""
    texts = [line.rstrip("\n") for t in args.text for line in (sys.stdin if t == "-" else [t])]
    texts = [t for t in texts if t.strip()] if "-" in args.text else texts
    if not texts:
        raise UserError("nothing to translate: pass sentences (or '-' for standard input)")
    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam must be at least 1 (got {args.beam})")
    rows = loaded.task.predict(loaded.model, texts, beam=args.beam, length_penalty=args.length_penalty)
    for text, row in zip(texts, rows, strict=True):
        print(json.dumps({"input": text, **row}, ensure_ascii=False) if args.json
              else row.get("translation", f"error: {row.get('error')}"))
        if "note" in row and not args.json:
            print(f"note: {row['note']}", file=sys.stderr)
    bad = sum("error" in r for r in rows)
    if bad:
        print(f"nnlab translate: error: {bad} of {len(rows)} inputs could not be read", file=sys.stderr)
        return 2
    return 0
