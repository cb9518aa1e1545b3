"""Results and speed of shipped recipes, end to end, as a user runs them.

Each recipe is trained by the real command line in a fresh process (start-up, data loading, training,
final evaluation and report included in the wall time), for one or more seeds; the script prints a
Markdown table with the final metric (mean over seeds; `--metric`, default test/acc), wall time, training
throughput, and the training time until the evaluated metric first reached each `--reach` threshold (read
from metrics.jsonl; "reached" is >= for accuracies, <= for losses, as the run's summary says).

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/recipes.py digits-cnn digits-mlp
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/recipes.py mnist-cnn mnist-mlp --reach 0.99 \\
        --eval test      # time-to-99% needs an evaluation each epoch on the reported split
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/recipes.py shakespeare-char --metric val/loss \\
        --reach 1.7 1.6
    .venv/bin/python benchmarks/recipes.py frozenlake-qlearning taxi-sarsa --metric test/return --seeds 5
                         # RL: samples/s is env steps/s; time-to-X reads the val evaluations

Extra arguments after `--` are passed to `nnlab train` as overrides (e.g. `-- train.epochs=3`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(recipe: str, seed: int, out: Path, overrides: list[str]) -> tuple[Path, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "nnlab", "train", recipe, "--out", str(out), "-q",
                          f"train.seed={seed}", *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{recipe} failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1]), wall


def time_to(rows: list[dict], key: str, threshold: float, higher: bool) -> float | None:
    for r in rows:
        if key in r and "train_time" in r and (r[key] >= threshold if higher else r[key] <= threshold):
            return r["train_time"]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per recipe")
    p.add_argument("--metric", default="test/acc", help="final metric to report (default test/acc)")
    p.add_argument("--reach", type=float, nargs="*", default=[], help="thresholds of the metric for time-to-X")
    p.add_argument("--eval", default=None, help="split evaluated every epoch (e.g. test, for time-to-X)")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.eval:
        overrides += [f"train.eval_splits=[val,{args.eval}]"]
    out = Path(args.out or tempfile.mkdtemp(prefix="nnlab-bench-"))
    rows = []
    for recipe in args.recipes:
        results = []
        for seed in range(args.seeds):
            folder, wall = train(recipe, seed, out, overrides)
            s = json.loads((folder / "summary.json").read_text())
            metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            split, kind = args.metric.split("/", 1)
            higher = (s.get("best") or {}).get("higher_is_better", kind in ("acc", "return", "success"))
            reach = {t: time_to(metrics, f"{args.eval or split}/{kind}", t, higher) for t in args.reach}
            speed = s.get("samples_per_s") or s.get("env_steps_per_s")  # RL runs count env steps
            results.append({"seed": seed, "value": s["final"].get(args.metric), "wall_s": wall,
                            "train_s": s["train_time_s"], "samples_per_s": speed, "reach": reach, "run": str(folder)})
            print(json.dumps({"recipe": recipe, **results[-1]}), file=sys.stderr)
        values = [r["value"] for r in results]
        rows.append((recipe, results, statistics.mean(values), statistics.pstdev(values)))
    print(f"\n| recipe | seeds | {args.metric} (mean ± sd) | wall s (mean) | train s | samples/s |"
          + "".join(f" time to {t:g} (s) |" for t in args.reach))
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(args.reach))
    for recipe, results, mean, sd in rows:
        reach = "".join(
            " " + (f"{statistics.mean(v):.1f}" if all(v := [r["reach"][t] for r in results if r["reach"][t]])
                   and len(v) == len(results) else "not reached") + " |" for t in args.reach)
        print(f"| {recipe} | {len(results)} | {mean:.4f} ± {sd:.4f} | "
              f"{statistics.mean(r['wall_s'] for r in results):.1f} | "
              f"{statistics.mean(r['train_s'] for r in results):.1f} | "
              f"{statistics.mean(r['samples_per_s'] for r in results):.0f} |{reach}")
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
