"""Masked-language modelling (BERT's pretraining objective, Devlin et al. 2019) on unlabelled text
(`data.name=unlabelled`, data/corpus.py) with an encoder and a masked-LM head (`model.name=encoder-mlm`):

    nnlab train imdb-mlm
    nnlab train imdb-transformer init.from=RUN data.vocab_from=RUN      # fine-tune: the encoder and its vocabulary

Masking (`mask_tokens`, vectorised over the batch): `mask_prob` of each text's real tokens are chosen (rounded, at
least one; padding never), of these `replace_mask` (80%) become `<mask>`, `replace_random` (10%) a random
non-special token, and the rest (10%) stay as they are; the loss is the cross-entropy of the original token at the
chosen positions alone. Training draws from torch's generator (seeded and restored by the loop: a run and its
resumption mask alike); evaluation masks each batch with a generator seeded by `eval_seed` and the batch's
content, so the same text in the same batch is masked the same way at every evaluation and val losses compare.
Metrics: `loss` (nats per chosen token), `acc` (the share of chosen tokens predicted exactly), `ppl` = exp(loss).

`nnlab predict RUN --text "the acting was <mask> and the plot <mask> ."` fills in each `<mask>` with the likeliest
token (`--top k`: the k likeliest, with their probabilities), never a special one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..data import Batch
from ..data.corpus import MASK
from . import TaskBase, tasks


@dataclass
class MLMConfig:
    name: str = "mlm"
    mask_prob: float = 0.15  # the share of each text's real tokens chosen for prediction (at least one)
    replace_mask: float = 0.8  # of the chosen tokens: the share replaced by <mask>
    replace_random: float = 0.1  # of the chosen tokens: the share replaced by a random token (the rest stay)
    eval_seed: int = 0  # evaluation masks a batch with a generator seeded by this and the batch's token ids

    def __post_init__(self) -> None:
        check(0 < self.mask_prob < 1, "task.mask_prob", "must be in (0, 1)")
        check(self.replace_mask >= 0 and self.replace_random >= 0 and self.replace_mask + self.replace_random <= 1,
              "task.replace_mask", "replace_mask and replace_random must be >= 0 with a sum <= 1")


def mask_tokens(x: Tensor, cfg: MLMConfig, spec: Any, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(inputs (B, T), chosen (B, T) bool) for token ids `x` (B, T) right-padded with `spec.pad_id`: each text's
    round(mask_prob * length) real tokens (at least one) chosen uniformly, then <mask>, a random token of
    [spec.specials, vocab_size) or kept, as `cfg` says. Every draw comes from `gen` (None: torch's default)."""
    real = x != spec.pad_id  # (B, T)
    n = real.sum(1)  # (B,) real tokens per text
    k = torch.minimum((n * cfg.mask_prob).round().clamp(min=1), n)  # (B,) tokens to choose per text
    score = torch.rand(x.shape, generator=gen, device=x.device).masked_fill(~real, 2.0)  # padding ranks last
    rank = score.argsort(1).argsort(1)  # (B, T): each position's rank among its text's scores
    chosen = rank < k[:, None]  # (B, T): k random real positions per text
    u = torch.rand(x.shape, generator=gen, device=x.device)  # (B, T): which replacement
    rand = torch.randint(spec.specials, spec.vocab_size, x.shape, generator=gen, device=x.device)
    inputs = torch.where(chosen & (u < cfg.replace_mask), spec.mask_id, x)
    swap = chosen & (u >= cfg.replace_mask) & (u < cfg.replace_mask + cfg.replace_random)
    return torch.where(swap, rand, inputs), chosen


class MaskedLM(TaskBase):
    monitor = "loss"

    def __init__(self, cfg: MLMConfig, spec):
        self.cfg, self.spec = cfg, spec
        check(hasattr(spec, "mask_id"), "task.name", "mlm needs text with a <mask> token: data.name=unlabelled")

    def _forward(self, model: nn.Module, x: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        inputs, chosen = mask_tokens(x, self.cfg, self.spec, gen)
        return model(inputs, chosen).float(), x[chosen]  # (N, V) logits, (N,) original tokens

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits, y = self._forward(model, batch["x"], None)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        x = batch["x"]
        seed = hash((self.cfg.eval_seed, *x.shape, int((x * torch.arange(1, x.shape[1] + 1, device=x.device)).sum())))
        gen = torch.Generator(device=x.device).manual_seed(seed & (2**63 - 1))
        logits, y = self._forward(model, x, gen)
        return {"loss_sum": F.cross_entropy(logits, y, reduction="sum").double(),
                "correct": (logits.argmax(-1) == y).sum(), "tokens": torch.tensor(len(y), device=x.device)}

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        n = max(int(stats["tokens"]), 1)
        loss = stats["loss_sum"].item() / n
        return {"loss": loss, "acc": int(stats["correct"]) / n, "ppl": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        """Each text with its `<mask>` marks filled in (`text`), the likeliest token and its probability per mark
        (`fill`) and, with `top` > 1, the `top` likeliest per mark (`top`); an error row for a text without a mark
        within the model's `max_len` tokens (a longer text is cut there)."""
        spec, device = self.spec, next(model.parameters()).device
        rows: list[dict[str, Any]] = []
        for text in inputs:
            ids: list[int] = []
            for i, piece in enumerate(text.split(MASK)):
                ids += ([spec.mask_id] if i else []) + (spec.tok.encode_lines([piece])[0] if piece.strip() else [])
            x = torch.tensor(ids[:spec.max_len], dtype=torch.long, device=device)[None]  # (1, T)
            where = x == spec.mask_id  # (1, T)
            if not where.any():
                rows.append({"error": f"no {MASK} within the model's {spec.max_len} tokens: mark the words to fill "
                                      f"in with {MASK}"})
                continue
            logits = model.eval()(x, where).float()  # (M, V)
            logits[:, :spec.specials] = float("-inf")  # never pad, unknown or mask
            p, idx = logits.softmax(-1).topk(min(top, spec.vocab_size - spec.specials), dim=-1)  # (M, k)
            filled = x[0].clone()
            filled[where[0]] = idx[:, 0]
            best = [[[spec.tok.decode([i]), q] for i, q in zip(ii, pp, strict=True)]
                    for ii, pp in zip(idx.tolist(), p.tolist(), strict=True)]  # per mark: the top tokens
            rows.append({"text": spec.tok.decode(filled.tolist()), "fill": [b[0] for b in best]}
                        | ({"top": best} if top > 1 else {}))
        return rows

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        spec, c = self.spec, self.cfg
        lines = ["", "## Masked language model", "", f"- corpus: {spec.corpus}",
                 f"- tokenizer: {spec.tokenizer}, {spec.vocab_size} tokens; texts of at most {spec.max_len} tokens",
                 f"- masking: {c.mask_prob:.0%} of each text's tokens, of which {c.replace_mask:.0%} <mask>, "
                 f"{c.replace_random:.0%} random, the rest unchanged"]
        final = summary.get("final", {})
        for split in ("val", "test"):
            if f"{split}/loss" in final:
                lines.append(f"- {split}: loss {final[f'{split}/loss']:.4f} nats per masked token, perplexity "
                             f"{final[f'{split}/ppl']:.2f}, masked-token accuracy {final[f'{split}/acc']:.4f}")
        lines.append(f"- fine-tune: `nnlab train <text recipe> init.from={folder} data.vocab_from={folder}` (an "
                     f"`encoder` of the same sizes)")
        return lines


@tasks.register("mlm", config=MLMConfig)
def mlm(cfg: MLMConfig, spec) -> MaskedLM:
    """Masked-language modelling (15% chosen: 80% <mask>, 10% random, 10% kept; loss, accuracy, perplexity)."""
    return MaskedLM(cfg, spec)
