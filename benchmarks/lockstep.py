"""Lockstep timing for a shared, noisy machine: training processes take turns, one chunk of steps each, so a slow
spell falls on all of them alike, and chunks run back to back are compared rather than whole runs minutes apart.

A worker reports each chunk's images/s on stdout and waits, off its clock, until the parent says go. nnlab's own
loop is paused inside `Tracker.log` (after a `perf/samples_per_s` row), before the loop restarts its timer, so no
wait is counted. Run as a script, this file is that worker for `nnlab.train` of whichever nnlab is on PYTHONPATH:

    PYTHONPATH=/tmp/before/src python benchmarks/lockstep.py mnist-cnn 200 20 train.precision=fp32
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def wait(rate: float) -> None:
    """Worker side: report a chunk's rate, then block until the parent says go (or has closed the pipe)."""
    print(json.dumps({"rate": rate}), flush=True)
    sys.stdin.readline()


def pause_nnlab_logs() -> None:
    """Make the loop of the nnlab on sys.path wait after every logged `perf/samples_per_s`."""
    from nnlab.track import Tracker

    log = Tracker.log

    def paused(self: Tracker, step: int, metrics: dict[str, float], **fields: Any) -> None:
        log(self, step, metrics, **fields)
        if "perf/samples_per_s" in metrics:
            wait(metrics["perf/samples_per_s"])

    Tracker.log = paused  # type: ignore[method-assign]


class Chunks:
    """For a hand-written loop: `tick()` at each step's end reports every `size` steps and waits off the clock."""

    def __init__(self, size: int, batch_size: int):
        self.size, self.batch_size, self.n, self.t0 = size, batch_size, 0, time.perf_counter()

    def tick(self) -> None:
        self.n += 1
        if self.n % self.size == 0:
            wait(self.size * self.batch_size / (time.perf_counter() - self.t0))
            self.t0 = time.perf_counter()


def rotated(names: list[str], k: int) -> list[str]:
    return names[k % len(names):] + names[:k % len(names)]


def alternate(workers: dict[str, tuple[list[str], dict[str, str] | None]], chunks: int,
              skip: int) -> dict[str, list[float]]:
    """Start every worker (command, environment), then let each run one chunk in turn (the first one rotating),
    `chunks` times; the rates of the chunks after the first `skip` (warm-up, and start-up that overlapped)."""
    procs = {name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for name, (cmd, env) in workers.items()}
    names, rates = list(procs), {name: list[float]() for name in procs}
    try:
        for c in range(chunks):
            for name in rotated(names, c):
                p = procs[name]
                if c:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                line = p.stdout.readline()
                if not line:
                    sys.exit(f"{name} ended before chunk {c + 1} of {chunks} (exit code {p.wait()})")
                rates[name].append(json.loads(line)["rate"])
                print(f"chunk {c + 1}/{chunks} {name}: {rates[name][-1]:.1f} images/s", file=sys.stderr, flush=True)
    finally:
        for p in procs.values():
            p.stdin.close()  # the last wait returns; the worker finishes its run
        codes = {name: p.wait() for name, p in procs.items()}
    if any(codes.values()):
        sys.exit(f"workers failed: {codes}")
    return {name: r[skip:] for name, r in rates.items()}


def compare(rates: dict[str, list[float]], ref: str) -> dict[str, dict[str, float]]:
    """Per worker: the median turn rate, and the median over turns of its rate / `ref`'s in the same turn."""
    return {name: {"median": statistics.median(r),
                   "paired_ratio": statistics.median(a / b for a, b in zip(r, rates[ref], strict=True))}
            for name, r in rates.items()}


def runs(workers: dict[str, tuple[list[str], dict[str, str] | None]], chunks: int, skip: int, n: int,
         ref: str) -> dict[str, Any]:
    """`n` lockstep runs of fresh processes, the first to go rotating. One process can run several percent
    faster or slower than an identical one for its whole life on a shared VM, whichever goes first, so one run
    compares processes as much as code: the geometric mean of the runs' paired ratios is the figure."""
    names, out = list(workers), list[dict[str, Any]]()
    for r in range(n):
        rates = alternate({k: workers[k] for k in rotated(names, r)}, chunks, skip)
        out.append({"turns": rates, "compare": compare(rates, ref)})
        print(f"run {r + 1}/{n}: " + ", ".join(f"{k} {v['median']:.1f} images/s ({v['paired_ratio']:.3f})"
                                               for k, v in out[-1]["compare"].items()), file=sys.stderr, flush=True)
    mean = {k: math.exp(statistics.fmean(math.log(o["compare"][k]["paired_ratio"]) for o in out)) for k in names}
    return {"runs": out, "paired_ratio": mean,
            "median": {k: statistics.median(o["compare"][k]["median"] for o in out) for k in names}}


def train_paused(recipe: str, steps: int, every: int, overrides: list[str]) -> None:
    """Train `recipe` for `steps` steps with the nnlab on sys.path, timing only: no evaluation, checkpoint or
    TensorBoard, a log (and a wait) every `every` steps, the run folder thrown away."""
    pause_nnlab_logs()
    import nnlab

    with tempfile.TemporaryDirectory() as tmp:
        nnlab.train(recipe, (*overrides, f"train.max_steps={steps}", f"train.log_every={every}", "train.eval_every=0",
                             "train.eval_every_steps=0", "train.final_splits=[]", "train.tensorboard=false",
                             "train.checkpoint_every=0"), out=tmp, quiet=True, progress=False)


def main() -> None:
    """Worker: `lockstep.py RECIPE STEPS EVERY [key=value ...]`."""
    recipe, steps, every, *overrides = sys.argv[1:]
    train_paused(recipe, int(steps), int(every), overrides)


if __name__ == "__main__":
    main()
