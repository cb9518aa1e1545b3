"""A real training subprocess killed with SIGKILL at a random moment leaves every file complete or
absent, and `--resume` finishes with exactly the metrics of an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import REPO, TINY, nnlab

from nnlab import run as R

LONG = {**TINY, "train": {**TINY["train"], "epochs": 40, "checkpoint_every": 8, "log_every": 4}}
VOLATILE = ("time", "train_time", "perf/samples_per_s")


def comparable(folder: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in R.read_metrics(folder)]


def last_step(folder: Path) -> int:
    rows = R.read_metrics(folder)
    return rows[-1]["step"] if rows else 0


def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump(LONG))
    ref = nnlab("train", str(recipe), "--out", str(tmp_path / "ref"), "-q")
    assert ref.returncode == 0, ref.stderr
    ref_dir = Path(ref.stdout.strip().splitlines()[-1])

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "nnlab", "train", str(recipe), "--out", str(tmp_path / "k"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    kill_after = random.Random().randint(20, 400)  # a different moment on every run of the suite
    deadline = time.time() + 120
    folder = None
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "k").glob("tiny-*"))
        if runs and (runs[0] / R.CHECKPOINTS).exists() and last_step(runs[0]) >= kill_after:
            folder = runs[0]
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = folder or next((tmp_path / "k").glob("tiny-*"))
    # every file present is complete: JSON/YAML parse, checkpoints load (after folder-swap recovery)
    yaml.safe_load((folder / R.CONFIG).read_text())
    for ckpt in (folder / R.CHECKPOINTS).glob("*"):
        if not ckpt.name.endswith(".tmp"):
            R.read_meta(ckpt)
            R.load_weights(ckpt)

    res = nnlab("train", "--resume", str(folder), "-q")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(folder)
    a = json.loads((ref_dir / R.SUMMARY).read_text())
    b = json.loads((folder / R.SUMMARY).read_text())
    assert a["final"] == b["final"] and a["steps"] == b["steps"] and a["best"] == b["best"]
    assert comparable(ref_dir) == comparable(folder)
    times = [row["time"] for row in R.read_metrics(folder)]  # the run's clock goes on across the sittings
    assert times == sorted(times) and b["wall_time_s"] >= times[-1]


def test_resume_rejects_non_runs(tmp_path: Path) -> None:
    res = nnlab("train", "--resume", str(tmp_path))
    assert res.returncode == 2 and "not an nnlab run folder" in res.stderr and "Traceback" not in res.stderr
