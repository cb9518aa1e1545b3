"""Token classification (named-entity recognition): a tagger's negative log-likelihood, entity-level precision,
recall and F1 as conlleval and seqeval compute them, a per-type report, and `predict`: the entities of each text
with their character spans.

    nnlab train conll-bilstm-crf
    nnlab predict RUN --text "EU rejects German call to boycott British lamb ." --json

The model answers the `Tagger` protocol (models/tagger.py): `model(x, chars, y, tokens=)` is each sentence's
negative log-likelihood (a CRF's, or its words' summed cross-entropies), `model(x, chars, tokens=)` the emission
scores (`tokens`: the batch's pretrained-tokenizer ids with data.vocab_from, else None), and
`nll`/`decode` score and decode those. The loss is averaged per word (the sum over the batch's sentences divided
by its words), so its scale does not depend on sentence length or batch size; `loss` in the metrics is the same.

Entities are the chunks of conlleval (Tjong Kim Sang 2000) and seqeval's default mode (not its strict mode): an
I- or E- tag after O or a tag of another type opens an entity too, so the tags of a model without a CRF, which may
break the scheme, are scored as those tools score them. An entity counts when its type and both ends are right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .. import run as R
from ..data import Batch
from ..data.conll import TagData, TagSpec, collate
from ..errors import UserError
from ..report import pyplot, save_figure
from . import TaskBase, tasks

ENDS = {("B", "B"), ("B", "S"), ("B", "O"), ("I", "B"), ("I", "S"), ("I", "O")}  # (previous, current) prefixes
STARTS = {("E", "E"), ("E", "I"), ("S", "E"), ("S", "I"), ("O", "E"), ("O", "I")}


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities (type, start, end), [start, end), of one sentence's tags in IOB1/BIO/BIOES, by conlleval's
    chunk rules (seqeval's `get_entities`, default mode)."""
    out: list[tuple[str, int, int]] = []
    prev, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        now, kind = tag[0], tag[1:].split("-", 1)[-1] or "_"
        if prev in "ES" or (prev, now) in ENDS or (prev != "O" and prev_type != kind):
            out.append((prev_type, begin, i))
        if now in "BS" or (prev, now) in STARTS or (now != "O" and prev_type != kind):
            begin = i
        prev, prev_type = now, kind
    return out


def prf(tp: Tensor, predicted: Tensor, gold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Precision, recall and F1 from counts (any shape); 0 where undefined (seqeval's zero_division=0)."""
    p = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    r = torch.where(gold > 0, tp / gold.clamp(min=1), 0.0)
    return p, r, torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), 0.0)


def tokens(batch: Batch) -> Tensor | None:
    """The pretrained tokenizer's ids of the words (data.vocab_from), if the batch has them."""
    return batch["tokens"] if "tokens" in batch else None


@runtime_checkable
class Tagger(Protocol):
    def nll(self, emissions: Tensor, y: Tensor, mask: Tensor) -> Tensor: ...

    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor: ...


@dataclass
class TaggingConfig:
    name: str = "tagging"


class Tagging(TaskBase):
    monitor = "f1"

    def __init__(self, cfg: TaggingConfig, spec: Any):
        if not isinstance(spec, TagSpec):
            raise UserError(f"the tagging task reads tagged words (e.g. data.name=conll2003); this data's spec is "
                            f"'{getattr(spec, 'kind', type(spec).__name__)}'")
        self.cfg, self.spec, self.types = cfg, spec, spec.types

    def tagger(self, model: nn.Module) -> Tagger:
        if not isinstance(model, Tagger):
            raise UserError(f"the tagging task needs a model that scores and decodes tags (model.name=tagger); "
                            f"{type(model).__name__} does not")
        return model

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x = batch["x"]
        nll = model(x, batch["chars"], batch["y"], tokens=tokens(batch))  # (B,) inside forward: DDP sees all of it
        return {"loss": nll.sum() / (x != 0).sum().clamp(min=1)}

    def counts(self, gold: list[list[str]], pred: list[list[str]]) -> Tensor:
        """(types, 3): per entity type, true positives, predicted and gold entities."""
        out = torch.zeros(len(self.types), 3, dtype=torch.int64)
        index = {k: i for i, k in enumerate(self.types)}
        for g, p in zip(gold, pred, strict=True):
            want, got = set(entities(g)), set(entities(p))
            for col, found in enumerate((want & got, got, want)):
                for kind, _, _ in found:
                    out[index[kind], col] += 1
        return out

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        x, y, net = batch["x"], batch["y"], self.tagger(model)
        mask = x != 0
        em = model(x, batch["chars"], tokens=tokens(batch))  # (B, T, K)
        nll, pred = net.nll(em, y, mask), net.decode(em, mask)
        n = mask.sum(1).tolist()
        tags = self.spec.tags
        gold = [[tags[i] for i in row[:k]] for row, k in zip(y.tolist(), n, strict=True)]
        guess = [[tags[i] for i in row[:k]] for row, k in zip(pred.tolist(), n, strict=True)]
        return {"loss_sum": nll.double().sum(), "tokens": mask.sum(), "correct": ((pred == y) & mask).sum(),
                "entities": self.counts(gold, guess).to(x.device)}

    def metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        c = stats["entities"].double()
        p, r, f1 = (v.item() for v in prf(*c.sum(0)))
        seen = (c[:, 1] + c[:, 2]) > 0  # macro: over the types predicted or present, as seqeval
        macro = prf(*c[seen].unbind(1))[2].mean().item() if seen.any() else 0.0
        n = max(int(stats["tokens"]), 1)
        return {"loss": stats["loss_sum"].item() / n, "acc": stats["correct"].item() / n, "f1": f1, "precision": p,
                "recall": r, "macro_f1": macro}

    def table(self, counts: Tensor) -> dict[str, dict[str, float]]:
        """The per-type report: precision, recall, F1, support per type, then micro and macro averages."""
        c = counts.double()
        p, r, f1 = prf(*c.unbind(1))
        out = {k: {"precision": p[i].item(), "recall": r[i].item(), "f1": f1[i].item(), "support": int(c[i, 2])}
               for i, k in enumerate(self.types)}
        mp, mr, mf = prf(*c.sum(0))
        seen = (c[:, 1] + c[:, 2]) > 0
        support = int(c[:, 2].sum())
        out["micro avg"] = {"precision": mp.item(), "recall": mr.item(), "f1": mf.item(), "support": support}
        out["macro avg"] = {key: (v[seen].mean().item() if seen.any() else 0.0) for key, v in
                            (("precision", p), ("recall", r), ("f1", f1))} | {"support": support}
        return out

    def describe(self, stats: dict[str, Any]) -> str:
        """The per-type table (PER, LOC, ORG, MISC, ...) with micro and macro averages, as Markdown."""
        rows = ["| entity | precision | recall | f1-score | support |", "|---|---:|---:|---:|---:|"]
        for k, v in self.table(stats["entities"]).items():
            name = f"**{k}**" if k.endswith(" avg") else k
            rows.append(f"| {name} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |")
        return "\n".join(rows)

    def summary(self, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"entities": {split: {"report": self.table(s["entities"]), "types": self.types,
                                     "counts": s["entities"].tolist()} for split, s in stats.items()}}

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        """Per split, the per-type table; one bar chart of the per-type F1 of every split; the first test
        sentences with their true and predicted entities."""
        splits = (summary.get("task") or {}).get("entities") or {}
        lines: list[str] = []
        for split, s in splits.items():
            lines += ["", f"## {split}: entities (exact type and span, as conlleval)", "",
                      self.describe({"entities": torch.tensor(s["counts"])})]
        if splits:
            plot_f1({split: s["report"] for split, s in splits.items()}, folder / R.PLOTS / "entity_f1.png")
            lines += ["", "![per-entity F1](plots/entity_f1.png)"]
        if model is not None and isinstance(data, TagData) and "test" in data.splits:
            lines += ["", "## test: the first sentences, with [entity TYPE]", ""] + self.examples(model, data, "test")
        return lines

    @torch.no_grad()
    def examples(self, model: nn.Module, data: TagData, split: str, n: int = 10) -> list[str]:
        """A Markdown table of the first `n` sentences of `split` with their true and predicted entities."""
        batch = Batch(**collate(data.rows[split][:n])).to(next(model.parameters()).device)
        x = batch["x"]
        pred = self.tagger(model.eval()).decode(model(x, batch["chars"], tokens=tokens(batch)), x != 0).cpu()
        rows = ["| true | predicted |", "|---|---|"]
        for s, gold, guess in zip(data.sentences[split][:n], batch["y"].tolist(), pred.tolist(), strict=False):
            k = len(s.words)
            want, got = (entities([self.spec.tags[i] for i in t[:k]]) for t in (gold, guess))
            mark = "" if want == got else " ✗"
            rows.append(f"| {bracket(s.words, want)} | {bracket(s.words, got)}{mark} |")
        return rows

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        """The entities of each text line: type, text and character span [start, end) (`top` does not apply)."""
        batch, errors = self.spec.encode(inputs)
        rows: list[dict[str, Any]] = [{"error": e} if e else {} for e in errors]
        if batch is None:
            return rows
        net = self.tagger(model.eval())
        device = next(model.parameters()).device
        batch = batch.to(device)
        x = batch["x"]
        pred = net.decode(model(x, batch["chars"], tokens=tokens(batch)), x != 0).tolist()  # (B, T) tag ids
        good = [r for r in rows if "error" not in r]
        texts = [t for t, e in zip(inputs, errors, strict=True) if not e]
        for row, text, tags, spans, note in zip(good, texts, pred, batch["spans"], batch["notes"], strict=True):
            found = entities([self.spec.tags[i] for i in tags[:len(spans)]])
            row["entities"] = [{"type": k, "text": text[spans[a][0]:spans[b - 1][1]], "start": spans[a][0],
                                "end": spans[b - 1][1]} for k, a, b in found]
            if note:
                row["note"] = note
        return rows


def bracket(words: Sequence[str], found: Sequence[tuple[str, int, int]]) -> str:
    """Words with their entities in brackets, '[EU ORG] rejects [German MISC] call', for a Markdown cell."""
    out = list(words)
    for kind, a, b in found:
        out[a] = f"[{out[a]}"
        out[b - 1] = f"{out[b - 1]} {kind}]"
    return " ".join(out).replace("|", "&#124;")


def plot_f1(reports: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Grouped bars: the F1 of each entity type (and the micro average), one bar per split."""
    plt = pyplot()
    names = [k for k in next(iter(reports.values())) if k != "macro avg"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 3.2))
    width = 0.8 / len(reports)
    for j, (split, rep) in enumerate(reports.items()):
        xs = [i + (j - (len(reports) - 1) / 2) * width for i in range(len(names))]
        values = [100 * rep[k]["f1"] for k in names]
        ax.bar(xs, values, width, label=split)
        for xi, v in zip(xs, values, strict=True):
            ax.text(xi, v + 1, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), ["all (micro)" if n == "micro avg" else n for n in names])
    ax.set_ylabel("entity F1 (%)")
    ax.set_ylim(0, 118)
    ax.legend(fontsize=8, loc="upper left", ncol=len(reports))
    save_figure(fig, path)


@tasks.register("tagging", config=TaggingConfig)
def tagging(cfg: TaggingConfig, spec: Any) -> Tagging:
    """Token classification (BIO/BIOES tags) with entity-level F1 as conlleval computes it."""
    return Tagging(cfg, spec)
