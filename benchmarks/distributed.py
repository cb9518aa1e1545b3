"""Training throughput of one recipe with 1 and 2 CPU processes under torchrun (1 thread each) and
with 1 process using 2 threads; images/s is read from each run's summary.json (training time only).

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/distributed.py mnist-cnn --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads((Path(res.stdout.strip().splitlines()[-1]) / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe", nargs="?", default="mnist-cnn")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="nnlab-dist-")
    common = ["train", args.recipe, "--out", out, "-q", f"train.max_steps={args.steps}", "train.eval_every=0",
              "train.final_splits=[]", "train.tensorboard=false"]
    nnlab = [sys.executable, "-m", "nnlab"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cases = [
        ("1 process, 1 thread", nnlab + common + ["train.threads=1"], 1),
        ("1 process, 2 threads", nnlab + common + ["train.threads=2"], 2),
        ("torchrun 1 process, 1 thread", torchrun + ["--nproc_per_node=1", "-m", "nnlab"] + common, 1),
        ("torchrun 2 processes, 1 thread each", torchrun + ["--nproc_per_node=2", "-m", "nnlab"] + common, 1),
    ]
    print(f"| {args.recipe}, {args.steps} steps | images/s | processes |\n|---|---:|---:|")
    for name, cmd, threads in cases:
        s = run(cmd, threads)
        print(f"| {name} | {s['samples_per_s']:.0f} | {s['world_size']} |", flush=True)


if __name__ == "__main__":
    main()
