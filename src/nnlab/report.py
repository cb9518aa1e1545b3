"""`report.md` and the training curves, assembled from a run folder; the sections of a family (a confusion
matrix, sample grids, attention maps) come from its task or loop, which draw with `pyplot`/`save_figure`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from . import run as R

SUMMARY_KEYS = ("status", "steps", "epochs", "wall_time_s", "train_time_s", "samples_per_s", "params", "device",
                "world_size", "precision", "seed", "nnlab_version", "torch_version")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Render to bytes, then write atomically: a kill never leaves a torn PNG."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    R.atomic_write(path, buf.getvalue())


def plot_curves(rows: list[dict[str, Any]], kinds: list[str], path: Path) -> bool:
    """One panel per metric kind (e.g. loss, acc) against step, a line per split that logged it."""
    splits = sorted({k.split("/")[0] for r in rows for k in r if "/" in k} - {"perf"})
    kinds = [k for k in dict.fromkeys(kinds) if any(f"{s}/{k}" in r for r in rows for s in splits)]
    if not kinds:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for split in splits:
            pts = [(r["step"], r[f"{split}/{kind}"]) for r in rows if f"{split}/{kind}" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    return True


def write_report(folder: Path, sections: list[str], kinds: list[str]) -> Path:
    """report.md: the summary, the final metrics, the curves of `kinds`, the family's `sections`, the config."""
    folder = Path(folder)
    summary = R.read_json(folder / R.SUMMARY) if (folder / R.SUMMARY).exists() else {}
    lines = [f"# Run report: {folder.name}", ""]
    if summary:
        lines += ["| | |", "|---|---|", *(f"| {k} | {summary.get(k)} |" for k in SUMMARY_KEYS if k in summary)]
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in summary.get("final", {}).items()]
        if summary.get("best"):
            lines += ["", f"Best checkpoint: {summary['best']}"]
    if plot_curves(R.read_metrics(folder), kinds, folder / R.PLOTS / "curves.png"):
        lines += ["", "## Training curves", "", "![curves](plots/curves.png)"]
    lines += sections
    lines += ["", "## Config", "", "```yaml", R.yaml_dump(R.read_config(folder)).rstrip(), "```", ""]
    R.atomic_write(folder / R.REPORT, "\n".join(lines))
    return folder / R.REPORT
