"""SimCLR on CIFAR-10: pretraining, the linear probe on it and on a random encoder, and cifar10-fast fine-tuned from
it against from scratch at 1% and 10% of the labels (data.subset=500 and 5000). Prints a Markdown table.

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/simclr.py --threads 2
    # the whole chain in a few minutes, to check the script (figures meaningless):
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/simclr.py --smoke

The budget: <= 30 reference-machine minutes of pretraining (training time, evaluations excluded); the 2-core
machine of docs/benchmarks.md runs ~1.15x the reference in bf16, so the recipe's pretraining is sized for ~26
minutes there. The pretraining run's own `train_time_s` is printed, so a slower machine shows what it needed.

Fine-tuning on a subset keeps cifar10-fast's recipe but its batch (2,000 > 500 images) and epochs: batch 250 for
500 images, 500 for 5,000, learning rates scaled with the batch as the recipe's comment says (nnlab averages the
loss), epochs so that both see ~80-160 steps; both arms (from SimCLR, from scratch) run exactly the same settings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBSETS = {500: (250, 40), 5000: (500, 16)}  # images -> (batch size, epochs)


def train(recipe: str, out: Path, overrides: list[str]) -> tuple[Path, dict, float]:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "nnlab", "train", recipe, "--out", str(out), "-q", *overrides],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"nnlab train {recipe} {' '.join(overrides)} failed:\n{res.stderr[-3000:]}")
    folder = Path(res.stdout.strip().splitlines()[-1])
    summary = json.loads((folder / "summary.json").read_text())
    print(
        f"{recipe} {' '.join(overrides)}: {json.dumps(summary['final'])}, train {summary['train_time_s']:.0f} s, "
        f"wall {wall:.0f} s, {summary['samples_per_s']:.0f} images/s",
        file=sys.stderr,
        flush=True,
    )
    return folder, summary, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    p.add_argument("--out", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--pretrained", default=None, help="reuse this cifar10-simclr run instead of pretraining")
    p.add_argument("--smoke", action="store_true", help="a few steps of every run: checks the chain, not the figures")
    args, extra = p.parse_known_args()  # extra: overrides for the pretraining run (e.g. train.epochs=12)
    out = Path(args.out or tempfile.mkdtemp(prefix="nnlab-simclr-"))
    common = [f"train.threads={args.threads}", "train.tensorboard=false"]
    short = ["train.max_steps=3", "train.eval_every=0"] if args.smoke else []
    rows: list[tuple[str, str, float | None, float | None, float]] = []  # (what, metric, value, train s, images/s)

    if args.pretrained:
        pre = Path(args.pretrained)
        s = json.loads((pre / "summary.json").read_text())
    else:
        knn = ["task.knn_bank=1000", "train.eval_every_steps=2"] if args.smoke else []
        pre, s, _ = train("cifar10-simclr", out, [*common, *short, *knn, *extra])
    rows.append(
        (
            "SimCLR pretraining (cifar10-simclr)",
            "test kNN acc",
            s["final"].get("test/knn_acc"),
            s["train_time_s"],
            s["samples_per_s"],
        )
    )

    for name, init in (("linear probe, SimCLR encoder", [f"init.from={pre}"]), ("linear probe, random encoder", [])):
        _, s, _ = train("cifar10-linear-probe", out, [*common, *short, *init])
        rows.append((name, "test acc", s["final"].get("test/acc"), s["train_time_s"], s["samples_per_s"]))

    for subset, (batch, epochs) in SUBSETS.items():
        scale = batch / 2000  # cifar10-fast's SGD rates are for its batch of 2,000
        settings = [
            f"data.subset={subset}",
            f"train.batch_size={batch}",
            f"train.epochs={epochs}",
            f"optim.lr={106.0 * scale:g}",
            f"model.head_lr={1340.0 * scale:g}",
            "train.eval_every=0",
        ]
        for name, init in (("SimCLR", [f"init.from={pre}"]), ("scratch", [])):
            _, s, _ = train("cifar10-fast", out, [*common, *settings, *short, *init])
            rows.append(
                (
                    f"cifar10-fast, {subset} labels ({subset // 500}%), from {name}",
                    "test acc (TTA)",
                    s["final"].get("test/acc"),
                    s["train_time_s"],
                    s["samples_per_s"],
                )
            )

    print(f"\nruns in {out}\n\n| run | metric | value | train s | images/s |\n|---|---|---:|---:|---:|")
    for what, metric, value, secs, speed in rows:
        shown = f"{value:.4f}" if value is not None else "-"
        print(f"| {what} | {metric} | {shown} | {secs:.0f} | {speed:.0f} |")


if __name__ == "__main__":
    main()
