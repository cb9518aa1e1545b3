"""Classification: cross-entropy (optionally label-smoothed), accuracy, per-class precision/recall/F1,
a confusion matrix, test-time augmentation for images, and its report (confusion matrix, and a grid of test
images or a table of test texts, predicted; an attention heat map of one test text when the model has
`attention(x)`) and `predict` on raw inputs (read by the data's spec: image files, text lines)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import run as R
from ..config import check
from ..data import Batch, pad
from ..data.image import ImageSpec
from ..data.sentences import TextSpec
from ..report import pyplot, save_figure
from . import TaskBase, tasks


@runtime_checkable
class ShowsAttention(Protocol):
    def attention(self, x: Tensor) -> Tensor:
        """Self-attention weights (layers, heads, T', T') of one text `x` (1, T); T' - T leading positions are the
        model's own (a CLS vector)."""


@dataclass
class ClassificationConfig:
    name: str = "classification"
    label_smoothing: float = 0.0  # cross-entropy label smoothing (Szegedy et al. 2016)
    tta: str = "none"  # test-time augmentation: none | flip | flip_translate (final evaluation, eval, predict)

    def __post_init__(self) -> None:
        check(0.0 <= self.label_smoothing < 1.0, "task.label_smoothing", "must be in [0, 1)")
        check(self.tta in ("none", "flip", "flip_translate"), "task.tta", "must be none, flip or flip_translate")


class Classification(TaskBase):
    monitor = "acc"

    def __init__(self, cfg: ClassificationConfig, spec):
        self.cfg, self.spec, self.num_classes, self.classes = cfg, spec, spec.num_classes, spec.classes
        check(cfg.tta == "none" or isinstance(spec, ImageSpec), "task.tta", "flips and shifts images: use none")

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """Logits, averaged over the test-time-augmented views when `tta` is set."""
        out = model(x).float()
        if self.cfg.tta == "none":
            return out
        views = [out, model(x.flip(-1)).float()]
        if self.cfg.tta == "flip_translate":  # one-pixel shifts of both orientations (as in airbench)
            for v in (x, x.flip(-1)):
                pad = F.pad(v, (1, 1, 1, 1), mode="reflect")
                views.append(0.5 * (model(pad[..., :-2, :-2]).float() + model(pad[..., 2:, 2:]).float()))
        return torch.stack(views).mean(0)

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        logits = self.logits(model, x) if final else model(x).float()  # no TTA while training (airbench)
        pred = logits.argmax(1)
        k = self.num_classes
        confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)  # rows: true, cols: predicted
        loss = F.cross_entropy(logits, y, reduction="sum")
        return {"loss_sum": loss.double(), "confusion": confusion.long()}

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        cm = stats["confusion"].double()
        n = cm.sum().clamp(min=1)
        p, r, f1, _ = per_class(cm)
        return {"loss": (stats["loss_sum"] / n).item(), "acc": (cm.trace() / n).item(),
                "macro_f1": f1.mean().item(), "macro_precision": p.mean().item(), "macro_recall": r.mean().item()}

    def describe(self, stats: dict[str, Tensor]) -> str:
        """A per-class table like scikit-learn's `classification_report`, as Markdown."""
        cm = stats["confusion"].double()
        p, r, f1, support = per_class(cm)
        rows = ["| class | precision | recall | f1-score | support |", "|---|---:|---:|---:|---:|"]
        for i, c in enumerate(self.classes):
            rows.append(f"| {c} | {p[i]:.4f} | {r[i]:.4f} | {f1[i]:.4f} | {int(support[i])} |")
        n = support.sum()
        rows.append(f"| **accuracy** | | | {(cm.trace() / n.clamp(min=1)).item():.4f} | {int(n)} |")
        rows.append(f"| **macro avg** | {p.mean():.4f} | {r.mean():.4f} | {f1.mean():.4f} | {int(n)} |")
        w = support / n.clamp(min=1)
        rows.append(f"| **weighted avg** | {(p * w).sum():.4f} | {(r * w).sum():.4f} | {(f1 * w).sum():.4f} "
                    f"| {int(n)} |")
        return "\n".join(rows)

    @torch.no_grad()
    def probs(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.logits(model, x).softmax(-1)  # (B, num_classes) probabilities

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        """Class and probability (and the `top` classes) of each raw input the data's spec can read; a `note`
        where the spec's batch has one for the input (a text cut to the model's limit)."""
        batch, errors = self.spec.encode(inputs)
        rows: list[dict[str, Any]] = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            device = next(model.parameters()).device
            p, idx = self.probs(model.eval(), batch.to(device)["x"]).topk(min(top, self.num_classes), dim=1)
            good = [r for r in rows if "error" not in r]
            notes = batch["notes"] if "notes" in batch else [None] * len(batch)
            for row, pi, ii, note in zip(good, p.tolist(), idx.tolist(), notes, strict=True):
                row |= {"class": self.classes[ii[0]], "prob": pi[0]}
                if top > 1:
                    row["top"] = [[self.classes[i], q] for i, q in zip(ii, pi, strict=True)]
                if note:
                    row["note"] = note
        return rows

    def summary(self, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"confusion": {split: s["confusion"].tolist() for split, s in stats.items()}}

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        """Per split, the per-class table and the confusion matrix; the first test images, predicted."""
        lines: list[str] = []
        for split, cm in ((summary.get("task") or {}).get("confusion") or {}).items():
            plot_confusion(cm, self.classes, folder / R.PLOTS / f"confusion_{split}.png")
            lines += ["", f"## {split}: per-class report", "", self.describe({"confusion": torch.tensor(cm)}),
                      "", f"![confusion {split}](plots/confusion_{split}.png)"]
        if model is not None and data is not None and "test" in data.splits and isinstance(self.spec, ImageSpec):
            device = next(model.parameters()).device
            batch = next(iter(data.loader("test", 32, device=device).epoch(0)))
            p, idx = self.probs(model.eval(), batch["x"]).float().cpu().max(1)
            plot_predictions(self.spec.pixels(batch["x"]), [self.classes[i] for i in batch["y"].tolist()],
                             [self.classes[i] for i in idx.tolist()], p.tolist(), folder / R.PLOTS / "predictions.png")
            lines += ["", "## Test predictions (first images; red = wrong)", "",
                      "![predictions](plots/predictions.png)"]
        if model is not None and data is not None and "test" in data.splits and isinstance(self.spec, TextSpec):
            batch = next(iter(data.loader("test", 12).epoch(0)))
            lines += ["", "## Test predictions (a first batch; texts as the model reads them)", ""]
            lines += self.text_predictions(model, batch)
            lines += self.confident_mistakes(model, data)
            if isinstance(model, ShowsAttention):
                lines += self.attention_map(model, batch["x"], folder / R.PLOTS / "attention.png")
        return lines

    def attention_map(self, model: ShowsAttention, x: Tensor, path: Path, most: int = 40) -> list[str]:
        """A heat map of every layer's and head's self-attention over the shortest text of `x` (B, T) (its first
        `most` positions), and the report lines that show it."""
        row = x[(x != self.spec.pad_id).sum(1).argmin()]
        ids = row[row != self.spec.pad_id].tolist()
        w = model.attention(row[None, :len(ids)].to(next(model.parameters()).device)).float().cpu()
        labels = ["[CLS]"] * (w.shape[-1] - len(ids)) + [self.spec.tok.decode([i]) or "<unk>" for i in ids]
        plot_attention(w[..., :most, :most], labels[:most], path)
        cut = f" (its first {most} of {len(labels)} positions)" if len(labels) > most else ""
        return ["", f"## Attention of one test text{cut}: rows attend to columns, one map per layer and head", "",
                f"![attention]({R.PLOTS}/{path.name})"]

    @torch.no_grad()
    def confident_mistakes(self, model: nn.Module, data: Any, n: int = 8, limit: int = 2000) -> list[str]:
        """The `n` wrong predictions with the highest probability among the first `limit` test texts, as a table."""
        device, seen, wrong = next(model.parameters()).device, 0, []
        for batch in data.loader("test", 250).epoch(0):
            p, idx = self.probs(model.eval(), batch["x"].to(device)).float().cpu().max(1)
            for x, y, i, q in zip(batch["x"], batch["y"].tolist(), idx.tolist(), p.tolist(), strict=True):
                if i != y:
                    wrong.append((q, x[x != self.spec.pad_id], y))
            seen += len(batch)
            if seen >= limit:
                break
        if not wrong:
            return []
        worst = sorted(wrong, key=lambda r: -r[0])[:n]
        batch = Batch(x=pad([x for _, x, _ in worst], self.spec.pad_id)[0], y=torch.tensor([y for _, _, y in worst]))
        return ["", f"## The most confident mistakes (of the first {seen} test texts)", "",
                *self.text_predictions(model, batch)]

    def text_predictions(self, model: nn.Module, batch: Batch) -> list[str]:
        """A Markdown table of a batch of texts (the vocabulary's words, `<unk>` for the others) with their true
        and predicted classes."""
        device = next(model.parameters()).device
        p, idx = self.probs(model.eval(), batch["x"].to(device)).float().cpu().max(1)
        rows = ["| text | true | predicted |", "|---|---|---|"]
        for x, y, i, q in zip(batch["x"].tolist(), batch["y"].tolist(), idx.tolist(), p.tolist(), strict=True):
            text = self.spec.tok.decode(x)
            text = (text[:117] + "...") if len(text) > 120 else text
            mark = "" if i == y else " ✗"
            rows.append(f"| {text.replace('|', '&#124;')} | {self.classes[y]} | {self.classes[i]} ({q:.2f}){mark} |")
        return rows


def per_class(cm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows true, cols predicted);
    0 where undefined, as scikit-learn's `zero_division=0`."""
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    return precision, recall, f1, support


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    plt = pyplot()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    m = torch.tensor(cm, dtype=torch.float64)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    save_figure(fig, path)


def plot_attention(w: Tensor, labels: list[str], path: Path) -> None:
    """Attention weights (layers, heads, T, T) as a grid of heat maps, a row per layer, tokens on the axes."""
    plt = pyplot()
    L, H, T, _ = w.shape
    size = 1.2 + 0.12 * T
    fig, axes = plt.subplots(L, H, figsize=(size * H, size * L), squeeze=False)
    for i in range(L):
        for j in range(H):
            ax = axes[i][j]
            ax.imshow(w[i, j].numpy(), cmap="viridis", vmin=0, vmax=max(float(w[i, j].max()), 1e-6))
            ax.set_title(f"layer {i + 1}, head {j + 1}", fontsize=7)
            ax.set_xticks(range(T), labels if i == L - 1 else [""] * T, rotation=90, fontsize=5)
            ax.set_yticks(range(T), labels if j == 0 else [""] * T, fontsize=5)
    save_figure(fig, path)


def plot_predictions(images: Tensor, true: list[str], pred: list[str], prob: list[float], path: Path) -> None:
    """A grid of uint8 images (N, C, H, W) captioned 'pred (p) / true', wrong ones in red. Drawn as one
    mosaic on one axes (a subplot per image is ~10x slower)."""
    plt = pyplot()
    n, c, h, w = images.shape
    cols = min(8, n)
    rows = math.ceil(n / cols)
    gap = max(2, round(0.45 * h))  # a caption band above each row of images
    grid = torch.full((rows * (h + gap), cols * (w + 1), c), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top = r * (h + gap) + gap
        grid[top:top + h, q * (w + 1):q * (w + 1) + w] = images[i].permute(1, 2, 0)
    fig, ax = plt.subplots(figsize=(1.5 * cols, 1.9 * rows))
    grid = grid.numpy()
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, interpolation="nearest")
    for i in range(n):
        r, q = divmod(i, cols)
        ax.text(q * (w + 1) + w / 2, r * (h + gap) + gap - 0.6, f"{pred[i]} ({prob[i]:.2f}) / {true[i]}",
                ha="center", va="bottom", fontsize=6, color="black" if pred[i] == true[i] else "red")
    ax.axis("off")
    save_figure(fig, path)


@tasks.register("classification", config=ClassificationConfig)
def classification(cfg: ClassificationConfig, spec) -> Classification:
    """Single-label classification with cross-entropy."""
    return Classification(cfg, spec)
