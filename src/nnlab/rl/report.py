"""An RL run's report sections and plots: episodic return (raw and smoothed) against env steps and wall time with
the evaluations, losses and exploration (epsilon or entropy) and value estimates, and for a tabular agent the
learned values and greedy policy drawn on the environment's grid. Also the GIF writer of `nnlab play`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .. import run as R
from ..errors import UserError
from ..report import pyplot, save_figure, write_report
from .tabular import Tabular

PANELS = [("losses", ("loss/td", "loss/td_abs", "loss/policy", "loss/value")),
          ("exploration", ("rl/epsilon", "rl/entropy", "rl/action_std")),
          ("value estimates", ("rl/q_values", "rl/value"))]
ARROWS = {0: "\u2190", 1: "\u2193", 2: "\u2192", 3: "\u2191"}  # FrozenLake's actions: left, down, right, up


def smooth(y: np.ndarray) -> np.ndarray:
    """Exponential moving average over about a tenth of the points, debiased as TensorBoard's smoothing is."""
    alpha = min(1.0, 10 / max(len(y), 1))
    out, m = np.empty_like(y, dtype=np.float64), 0.0
    for i, v in enumerate(y):
        m = (1 - alpha) * m + alpha * v
        out[i] = m / (1 - (1 - alpha) ** (i + 1))
    return out


def plot_returns(rows: list[dict[str, Any]], path: Path) -> bool:
    train = [r for r in rows if "rl/episodic_return" in r]
    val = [r for r in rows if "val/return" in r]
    if not train and not val:
        return False
    plt = pyplot()
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("step", "time"), strict=True):
        if train:
            xs, ys = np.array([r[x] for r in train]), np.array([r["rl/episodic_return"] for r in train])
            ax.plot(xs, ys, alpha=0.3, color="C0", label="training episodes (raw)")
            ax.plot(xs, smooth(ys), color="C0", label="training episodes (smoothed)")
        if val:
            ax.plot([r[x] for r in val], [r["val/return"] for r in val], "o-", ms=3, color="C1",
                    label="greedy, val seeds")
        ax.set_xlabel("environment steps" if x == "step" else "wall time (s)")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel("episodic return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_panels(rows: list[dict[str, Any]], path: Path) -> bool:
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return False
    plt = pyplot()
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts, strict=True), label=k)
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_table(q: np.ndarray, desc: np.ndarray | None, path: Path) -> None:
    """max_a Q(s, a) with the greedy action of every state: on the map for a grid world (FrozenLake), else the
    whole table."""
    plt = pyplot()
    if desc is not None and desc.size == q.shape[0]:
        rows, cols = desc.shape
        v, pi = q.max(1).reshape(rows, cols), q.argmax(1).reshape(rows, cols)
        fig, ax = plt.subplots(figsize=(1.1 * cols + 1.5, 1.1 * rows))
        im = ax.imshow(v, cmap="viridis")
        for i in range(rows):
            for j in range(cols):
                cell = desc[i, j].decode() if isinstance(desc[i, j], bytes) else str(desc[i, j])
                text = cell if cell in "HG" else f"{cell if cell == 'S' else ''}{ARROWS.get(int(pi[i, j]), '')}"
                ax.text(j, i, text, ha="center", va="center", color="white" if v[i, j] < v.mean() else "black",
                        fontsize=14)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("max Q and the greedy policy (H hole, G goal)")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(q, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("action")
        ax.set_ylabel("state")
        ax.set_title("Q(s, a)")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def report(folder: Path, cfg: Any, agent: Any) -> Path:
    rows = R.read_metrics(folder)
    summary = R.read_json(folder / R.SUMMARY) if (folder / R.SUMMARY).exists() else {}
    plots = folder / R.PLOTS
    lines: list[str] = []
    if summary.get("solved"):
        s = summary["solved"]
        lines += ["", f"Solved (val return >= {summary.get('target_return')}) at env step {s['step']}, after "
                  f"{s['train_time_s']:.1f} s of training ({s['time_s']:.1f} s wall)."]
    elif summary.get("target_return") is not None:
        lines += ["", f"Not solved: no evaluation reached the target return {summary['target_return']}."]
    if plot_returns(rows, plots / "returns.png"):
        lines += ["", "## Episodic return", "", "![returns](plots/returns.png)"]
    if plot_panels(rows, plots / "training.png"):
        lines += ["", "## Losses, exploration and value estimates", "", "![training](plots/training.png)"]
    if isinstance(agent, Tabular):
        desc = _grid(cfg)
        plot_table(np.asarray(agent.q), desc, plots / "values.png")
        lines += ["", "## Learned values and greedy policy", "", "![values](plots/values.png)"]
    elif agent is None:
        lines += ["", "(The agent could not be loaded: the value plots are missing.)"]
    return write_report(folder, lines, [])


def _grid(cfg: Any) -> np.ndarray | None:
    """The map of a grid-world environment (FrozenLake's `desc`), if it has one."""
    from .envs import make

    try:
        env = make(cfg.env)
    except UserError:
        return None
    desc = getattr(env.unwrapped, "desc", None)
    env.close()
    return np.asarray(desc) if desc is not None else None


def write_gif(path: Path, episodes: list[list[np.ndarray]], fps: int = 30) -> None:
    """The frames of every episode, one after another, as one GIF (written atomically)."""
    from PIL import Image

    frames = [Image.fromarray(f) for ep in episodes for f in ep if f is not None]
    if not frames:
        raise UserError("the environment rendered no frames (it has no rgb_array render mode)")
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=max(1, 1000 // max(fps, 1)),
                   loop=0)
    try:
        R.atomic_write(Path(path), buf.getvalue())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
