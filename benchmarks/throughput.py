"""Training throughput of a recipe from two source trees in the same run (before/after a change): each round
trains `--steps` steps of the recipe with one tree, then the other (order alternating), in fresh processes;
images/s over the steps after the first (start-up, data loading and data-dependent init excluded).

    git worktree add /tmp/before <commit>
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/throughput.py cifar10-fast --trees /tmp/before . --steps 6

Extra `key=value` arguments are overrides for both trees (the trees must both know the keys).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def images_per_s(tree: Path, recipe: str, steps: int, overrides: list[str], out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve() / "src")}
    cmd = [sys.executable, "-m", "nnlab", "train", recipe, "--out", str(out), "-q", f"train.max_steps={steps}",
           "train.eval_every=0", "train.final_splits=[]", "train.log_every=1", "train.tensorboard=false", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"{tree}: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    folder = Path(res.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r][1:]  # after the first step
    return len(rates) / sum(1 / r for r in rates)  # the harmonic mean: images over seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--trees", nargs=2, type=Path, required=True, help="the two source trees (before after)")
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first is left out")
    p.add_argument("--rounds", type=int, default=2)
    args, overrides = p.parse_known_args()
    out = Path(tempfile.mkdtemp(prefix="nnlab-throughput-"))
    rates: dict[Path, list[float]] = {t: [] for t in args.trees}
    for r in range(args.rounds):
        for tree in args.trees if r % 2 == 0 else args.trees[::-1]:
            rates[tree].append(images_per_s(tree, args.recipe, args.steps, overrides, out))
            print(f"round {r + 1} {tree}: {rates[tree][-1]:.1f} images/s", file=sys.stderr, flush=True)
    before, after = (statistics.median(rates[t]) for t in args.trees)
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "rounds": {str(t): v for t, v in rates.items()},
                      "median_before": before, "median_after": after, "ratio_after_before": after / before}))


if __name__ == "__main__":
    main()
