"""Plots (curves, confusion matrix, predictions grid) and `report.md`, rendered from a run folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import run as R


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Render to bytes, then write atomically: a kill never leaves a torn PNG."""
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    R.atomic_write(path, buf.getvalue())


def plot_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    """Loss and accuracy against step, for every split logged (train/*, val/*, test/*)."""
    kinds = [k for k in ("loss", "acc") if any(key.endswith("/" + k) for r in rows for key in r)]
    if not kinds:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for split in ("train", "val", "test"):
            pts = [(r["step"], r[f"{split}/{kind}"]) for r in rows if f"{split}/{kind}" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    return True


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    plt = _plt()
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
    _save(fig, path)


def plot_predictions(images: torch.Tensor, true: list[str], pred: list[str], prob: list[float], path: Path) -> None:
    """A grid of uint8 images (N, C, H, W) captioned 'pred (p) / true', wrong ones in red. Drawn as one
    mosaic on one axes (a subplot per image is ~10x slower)."""
    plt = _plt()
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
    _save(fig, path)


def write_report(folder: Path, task: Any = None, model: Any = None, data: Any = None, prepare: Any = None,
                 n_images: int = 32) -> Path:
    """Render plots/*.png and report.md for a run. The predictions grid needs the model and data."""
    folder = Path(folder)
    plots = folder / R.PLOTS
    plots.mkdir(exist_ok=True)
    summary = R.read_json(folder / R.SUMMARY) if (folder / R.SUMMARY).exists() else {}
    config = R.read_config(folder)
    lines = [f"# Run report: {folder.name}", ""]
    if summary:
        lines += ["| | |", "|---|---|"]
        for key in ("status", "steps", "epochs", "wall_time_s", "train_time_s", "samples_per_s", "params", "device",
                    "world_size", "precision", "seed", "nnlab_version", "torch_version"):
            lines.append(f"| {key} | {summary.get(key)} |")
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in summary.get("final", {}).items()]
        if summary.get("best"):
            lines += ["", f"Best checkpoint: {summary['best']}"]
    if plot_curves(R.read_metrics(folder), plots / "curves.png"):
        lines += ["", "## Training curves", "", "![curves](plots/curves.png)"]
    spec = data.spec if data is not None else None
    classes = spec.classes if spec else None
    for split, cm in (summary.get("confusion") or {}).items():
        classes = classes or [str(i) for i in range(len(cm))]
        plot_confusion(cm, classes, plots / f"confusion_{split}.png")
        lines += ["", f"## {split}: per-class report", ""]
        if task is not None and hasattr(task, "report"):
            lines += [task.report({"confusion": torch.tensor(cm)}), ""]
        lines += [f"![confusion {split}](plots/confusion_{split}.png)"]
    if model is not None and data is not None and "test" in data.splits:
        x, y = data.splits["test"]
        x, y = x[:n_images], y[:n_images]
        device = next(model.parameters()).device
        probs = task.predict(model.eval(), prepare(x.to(device))).float().cpu()
        p, idx = probs.max(1)
        plot_predictions(x, [classes[i] for i in y], [classes[i] for i in idx], p.tolist(),
                         plots / "predictions.png")
        lines += ["", "## Test predictions (first images; red = wrong)", "", "![predictions](plots/predictions.png)"]
    lines += ["", "## Config", "", "```yaml", R.yaml_dump(config).rstrip(), "```", ""]
    R.atomic_write(folder / R.REPORT, "\n".join(lines))
    return folder / R.REPORT
