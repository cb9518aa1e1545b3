"""CIFAR-10 speed run: nnlab's `cifar10-fast` recipe over several seeds, side by side with airbench.

airbench (KellerJordan/cifar10-airbench, `airbench94_muon.py`) is not part of nnlab and is never committed:
fetch it yourself, adapt it to the CPU (CUDA -> CPU, fp16 -> fp32 weights under bf16 autocast where the CPU
has native bf16, torchvision's loader -> the canonical tar.gz, no compile) and pass the command that runs it
as `--peer`. Both are timed in the same script run, one after the other (nnlab's seeds first), never at the same time.

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/cifar10_fast.py --seeds 5 \\
        --peer "cd benchmarks/_peers && python airbench94_muon_cpu.py"
    # a throughput-only comparison over the first N steps (both sides):
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/cifar10_fast.py --seeds 1 --max-steps 10 \\
        --peer "cd benchmarks/_peers && AIRBENCH_MAX_STEPS=10 python airbench94_muon_cpu.py"

Reports per seed: test accuracy with TTA, wall time (process start to exit), training time, images/s,
and training time to 91% and 94% test accuracy (evaluated after every epoch, outside the training time).
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


def time_to(rows: list[dict], threshold: float) -> float | None:
    return next((r["train_time"] for r in rows if r.get("test/acc", -1) >= threshold and "train_time" in r), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (to spread "
                   "the five seeds over several sittings: one takes ~54 min on a 2-core CPU)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each nnlab run after N steps (throughput only)")
    p.add_argument("--peer", default=None, help="shell command running the CPU-adapted airbench")
    p.add_argument("--out", default=None)
    args, overrides = p.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="nnlab-cifar-"))
    if args.max_steps:
        overrides += [f"train.max_steps={args.max_steps}", "train.eval_every=0", "train.final_splits=[]"]
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "nnlab", "train", "cifar10-fast", "--out", str(out), "-q",
                              f"train.seed={seed}", *overrides], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        folder = Path(res.stdout.strip().splitlines()[-1])
        s = json.loads((folder / "summary.json").read_text())
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        results.append({"seed": seed, "test_acc": s["final"].get("test/acc"), "wall_s": wall,
                        "train_s": s["train_time_s"], "images_per_s": s["samples_per_s"],
                        "to_91": time_to(rows, 0.91), "to_94": time_to(rows, 0.94)})
        print(json.dumps(results[-1]), file=sys.stderr)
    peer = None  # after nnlab's seeds, so they are on record even if this long run is cut short
    if args.peer:
        t0 = time.perf_counter()
        res = subprocess.run(args.peer, shell=True, capture_output=True, text=True)
        peer = {"wall_s": time.perf_counter() - t0, "rc": res.returncode, "tail": res.stdout[-1500:]}
        print(f"airbench: {peer['wall_s']:.1f} s (exit {res.returncode})\n{peer['tail']}", file=sys.stderr)
    print("\n| seed | test acc (TTA) | wall s | train s | images/s | train s to 91% (no TTA) | to 94% |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        acc = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
        print(f"| {r['seed']} | {acc} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['to_91'] or '-'} | {r['to_94'] or '-'} |")
    accs = [r["test_acc"] for r in results if r["test_acc"] is not None]
    walls = [r["wall_s"] for r in results]
    if accs:
        print(f"\nmean test accuracy {statistics.mean(accs):.4f} over {len(accs)} seeds")
    if peer:
        print(f"airbench wall {peer['wall_s']:.1f} s; nnlab mean wall {statistics.mean(walls):.1f} s; "
              f"ratio nnlab/airbench {statistics.mean(walls) / peer['wall_s']:.2f}")


if __name__ == "__main__":
    main()
