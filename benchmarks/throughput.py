"""Training throughput of a recipe from two source trees in the same run (before/after a change), in lockstep: one
process per tree trains the recipe, and they take turns, `--every` steps each (benchmarks/lockstep.py), so both see
the same machine; images/s per turn, the first `--skip` turns (start-up, warm-up) left out; `--runs` such runs of
fresh processes, the geometric mean of their paired ratios (one process can be faster than an identical one).

    git worktree add /tmp/before <commit>
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/throughput.py cifar10-fast --trees /tmp/before . --steps 8
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/throughput.py mnist-cnn --trees /tmp/before . \
        --steps 200 --every 10 train.precision=fp32

Extra `key=value` arguments are overrides for both trees (the trees must both know the keys). Keep `--steps`
within one epoch, or turns get out of step at the epoch's end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lockstep import runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--trees", nargs=2, type=Path, required=True, help="the two source trees (before after)")
    p.add_argument("--steps", type=int, default=8, help="steps per tree")
    p.add_argument("--every", type=int, default=1, help="steps per turn")
    p.add_argument("--skip", type=int, default=2, help="first turns left out")
    p.add_argument("--runs", type=int, default=3, help="lockstep runs of fresh processes")
    args, overrides = p.parse_known_args()
    if args.steps % args.every or args.steps // args.every <= args.skip:
        p.error("--steps must be a multiple of --every, with more than --skip turns")
    worker = str(Path(__file__).with_name("lockstep.py"))
    workers = {str(t): ([sys.executable, worker, args.recipe, str(args.steps), str(args.every), *overrides],
                        {**os.environ, "PYTHONPATH": str(t.resolve() / "src")}) for t in args.trees}
    before, after = (str(t) for t in args.trees)
    res = runs(workers, args.steps // args.every, args.skip, args.runs, before)
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "every": args.every, "overrides": overrides,
                      "median_before": res["median"][before], "median_after": res["median"][after],
                      "paired_ratio_after_before": res["paired_ratio"][after], "runs": res["runs"]}))


if __name__ == "__main__":
    main()
