"""Classification: cross-entropy (optionally label-smoothed), accuracy, per-class precision/recall/F1,
a confusion matrix, and test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from . import tasks


@dataclass
class ClassificationConfig:
    name: str = "classification"
    label_smoothing: float = 0.0  # cross-entropy label smoothing (Szegedy et al. 2016)
    tta: str = "none"  # test-time augmentation: none | flip | flip_translate (final evaluation, eval, predict)

    def __post_init__(self) -> None:
        check(0.0 <= self.label_smoothing < 1.0, "task.label_smoothing", "must be in [0, 1)")
        check(self.tta in ("none", "flip", "flip_translate"), "task.tta", "must be none, flip or flip_translate")


class Classification:
    def __init__(self, cfg: ClassificationConfig, spec):
        self.cfg, self.num_classes, self.classes = cfg, spec.num_classes, spec.classes

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
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

    def eval_stats(self, model: nn.Module, batch: tuple[Tensor, Tensor], final: bool = True) -> dict[str, Tensor]:
        x, y = batch
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

    def report(self, stats: dict[str, Tensor]) -> str:
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
    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.logits(model, x).softmax(-1)  # (B, num_classes) probabilities


def per_class(cm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows true, cols predicted);
    0 where undefined, as scikit-learn's `zero_division=0`."""
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    return precision, recall, f1, support


@tasks.register("classification", config=ClassificationConfig)
def classification(cfg: ClassificationConfig, spec) -> Classification:
    """Single-label classification with cross-entropy."""
    return Classification(cfg, spec)
