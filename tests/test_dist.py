"""torchrun with 2 CPU processes (gloo, DistributedDataParallel) gives the metrics of 1 process with the
same global batch and seed, on a model without batch norm or dropout. Tolerance: 1e-4 absolute on losses
(the two runs sum gradients in a different order), identical accuracies; and a distributed run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, nnlab

from nnlab import run as R

PARITY = {**TINY, "model": {"name": "mlp", "hidden": [32], "dropout": 0.0},
          "train": {**TINY["train"], "schedule": "constant", "epochs": 2}}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nnlab", *args], capture_output=True, text=True, env=env, timeout=300)


def final(folder: str) -> dict:
    return json.loads((Path(folder) / R.SUMMARY).read_text())


def close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_two_processes_match_one(tmp_path: Path) -> None:
    recipe = tmp_path / "parity.yaml"
    recipe.write_text(yaml.safe_dump(PARITY))
    one = nnlab("train", str(recipe), "--out", str(tmp_path / "one"), "-q")
    assert one.returncode == 0, one.stderr
    two = torchrun("train", str(recipe), "--out", str(tmp_path / "two"), "-q")
    assert two.returncode == 0, two.stderr
    lines = two.stdout.strip().splitlines()
    assert len([ln for ln in lines if "two/tiny-" in ln]) == 1  # only rank 0 prints and writes
    assert len(list((tmp_path / "two").iterdir())) == 1
    s1, s2 = final(one.stdout.strip().splitlines()[-1]), final(lines[-1])
    assert s2["world_size"] == 2 and s1["steps"] == s2["steps"]
    close(s1["final"], s2["final"])
    # a distributed run resumes: 2 epochs, then 2 more under torchrun == 4 epochs in one process
    more = torchrun("train", "--resume", lines[-1], "train.epochs=4", "-q")
    assert more.returncode == 0, more.stderr
    ref = nnlab("train", str(recipe), "--out", str(tmp_path / "ref"), "-q", "train.epochs=4")
    close(final(ref.stdout.strip().splitlines()[-1])["final"], final(lines[-1])["final"])


def test_batch_norm_statistics_are_rank_0s(tmp_path: Path) -> None:
    """Under DDP each rank updates its own batch-norm statistics; evaluations and checkpoints use rank 0's,
    so the reported metrics are those of the saved model (re-evaluated by one process)."""
    bn = {**TINY, "model": {"name": "cnn", "channels": [8], "hidden": 16, "dropout": 0.0},
          "train": {**TINY["train"], "epochs": 1, "monitor": "", "eval_every": 0}}
    recipe = tmp_path / "bn.yaml"
    recipe.write_text(yaml.safe_dump(bn))
    two = torchrun("train", str(recipe), "--out", str(tmp_path / "two"), "-q")
    assert two.returncode == 0, two.stderr
    folder = two.stdout.strip().splitlines()[-1]
    again = nnlab("eval", folder, "--split", "test", "--checkpoint", "last", "--json")
    assert again.returncode == 0, again.stderr
    again = json.loads(again.stdout)["metrics"]
    close(final(folder)["final"], {f"test/{k}": v for k, v in again.items()})
