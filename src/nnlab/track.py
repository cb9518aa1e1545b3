"""Tracking: metrics.jsonl (the contract), TensorBoard event files, and the console progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from . import run as R


class Tracker:
    """Logs namespaced scalars (`train/loss`, `val/acc`, `perf/samples_per_s`) for one run; a no-op
    on every process but rank 0."""

    def __init__(self, folder: Path | None, tensorboard: bool = True, purge_step: int | None = None,
                 rows: int = 0, elapsed: float = 0.0):
        # `time` counts the run's seconds over all its sittings: a resumed run goes on from `elapsed`
        self.folder, self.tb, self.t0 = folder, None, time.time() - elapsed
        self.rows = rows  # events in metrics.jsonl (those kept from before, for a resumed run)
        if folder is None:
            return
        self.file = open(folder / R.METRICS, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / R.TENSORBOARD), purge_step=purge_step)
            except ImportError:  # tensorboard not installed: metrics.jsonl is still complete
                self.tb = None

    def log(self, step: int, metrics: dict[str, float], **fields: Any) -> None:
        if self.folder is None:
            return
        row = {"step": step, **fields, "time": round(self.elapsed(), 3), **metrics}
        self.file.write(json.dumps(row) + "\n")  # one write per line: a kill tears at most the last line
        self.file.flush()
        self.rows += 1
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def close(self) -> None:
        if self.folder is not None:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class Progress:
    """A tqdm bar per epoch (ETA, loss, accuracy, samples/s); in quiet mode, one line per epoch."""

    def __init__(self, enabled: bool, quiet: bool):
        self.enabled, self.quiet, self.bar = enabled, quiet, None

    def start(self, epoch: int, epochs: int, total: int, initial: int, label: str = "") -> None:
        """A bar of `total` steps, named `label` (a loop without epochs: "env steps") or the epoch."""
        if not self.enabled or self.quiet:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=label or f"epoch {epoch + 1}/{epochs}", unit="step",
                        dynamic_ncols=True, file=sys.stderr, leave=True)

    def update(self, n: int, stats: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix({k.split("/")[-1]: _fmt(v) for k, v in stats.items()}, refresh=False)

    def end(self, epoch: int, epochs: int, stats: dict[str, float], label: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in stats.items()})
            self.bar.close()
            self.bar = None
        elif self.enabled:
            print(f"{label or f'epoch {epoch + 1}/{epochs}'} " + " ".join(f"{k}={_fmt(v)}" for k, v in stats.items()),
                  file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
