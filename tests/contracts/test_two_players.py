"""Contract: a task with two optimizers that alternate (GAN-style players) trains the same under torchrun as in
one process. The plugin's task returns `Optimizers([opt_features, opt_head])` over two sub-modules of its model
and makes the whole step in `update`: player 0 (the head) on detached features, `stepper.step(0)`; then player 1
(the feature extractor) through the head, `stepper.step(1)`, calling the SUB-MODULES directly (which DDP would
not see: the core hands such a task the unwrapped model and averages each optimizer's gradients over the
processes in `stepper.step`). Proven: 2 processes with the same global batch give the final metrics of 1 process
(losses to 1e-4, accuracies equal) and the same weights, both optimizers' states are checkpointed, and
eval/predict/report work on the distributed run through the CLI.

The plugin is a module written into a temporary folder, so the real CLI (and torchrun) in subprocesses import it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from harness import cli, install

from nnlab import run as R

PLUGIN = '''
"""Two players on one classifier: `features` (a hidden layer) and `head` (the logits), each with its own
optimizer, alternating within every training step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnlab.models import models
from nnlab.optim import Optimizers
from nnlab.tasks import TaskBase, tasks


@dataclass
class HalvesConfig:
    name: str = "plug_halves"
    hidden: int = 32


class Halves(nn.Module):
    def __init__(self, cfg, spec):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(spec.input_shape), cfg.hidden), nn.Tanh())
        self.head = nn.Linear(cfg.hidden, spec.num_classes)

    def forward(self, x):
        return self.head(self.features(x))


if "plug_halves" not in models:
    models.register("plug_halves", config=HalvesConfig)(lambda cfg, spec: Halves(cfg, spec))


@dataclass
class TurnsConfig:
    name: str = "plug_turns"
    lr_features: float = 0.05
    lr_head: float = 0.1


class Turns(TaskBase):
    monitor = "acc"

    def __init__(self, cfg, spec):
        self.cfg, self.spec = cfg, spec

    def optimizers(self, model):
        return Optimizers([torch.optim.SGD(model.head.parameters(), lr=self.cfg.lr_head, momentum=0.9),
                           torch.optim.SGD(model.features.parameters(), lr=self.cfg.lr_features, momentum=0.9)])

    def update(self, model, batch, opt, stepper):
        x, y = batch["x"], batch["y"]
        opt.zero_grad()
        # player 0, the head, on the features as they are (no gradient into the other player)
        with torch.no_grad():
            h = model.features(x)
        loss_head = F.cross_entropy(model.head(h), y)
        stepper.backward(loss_head)
        stepper.step(0)
        # player 1, the features, through the head as player 0 just left it
        logits = model.head(model.features(x))
        loss_features = F.cross_entropy(logits, y)
        stepper.backward(loss_features)
        stepper.step(1)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss_features, "loss_head": loss_head, "loss_features": loss_features, "acc": acc}

    def step(self, model, batch):
        logits = model(batch["x"])
        return {"loss": F.cross_entropy(logits, batch["y"])}

    def eval_stats(self, model, batch, final=True):
        logits = model(batch["x"]).float()
        y = batch["y"]
        return {"loss_sum": F.cross_entropy(logits, y, reduction="sum").double(),
                "correct": (logits.argmax(1) == y).sum(), "n": torch.tensor(len(y))}

    def metrics(self, stats):
        n = max(int(stats["n"]), 1)
        return {"loss": float(stats["loss_sum"]) / n, "acc": int(stats["correct"]) / n}

    def report(self, folder, summary, model, data):
        return ["", "## Players", "", "features and head, alternating within each step"]

    @torch.no_grad()
    def predict(self, model, inputs, top=1):
        batch, errors = self.spec.encode(inputs)
        rows = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            p = model.eval()(batch["x"]).softmax(-1)
            good = [r for r in rows if "error" not in r]
            for row, pi in zip(good, p, strict=True):
                row |= {"class": self.spec.classes[int(pi.argmax())], "prob": float(pi.max())}
        return rows


if "plug_turns" not in tasks:
    tasks.register("plug_turns", config=TurnsConfig)(lambda cfg, spec: Turns(cfg, spec))
'''

RECIPE = {**TINY, "name": "players", "model": {"name": "plug_halves", "hidden": 32},
          "task": {"name": "plug_turns"},
          "train": {**TINY["train"], "schedule": "constant", "epochs": 2, "batch_size": 32,
                    "precision": "fp32"}}


def test_two_optimizers_under_torchrun_match_one_process(tmp_path: Path) -> None:
    install(tmp_path, "plug_players", PLUGIN)
    recipe = tmp_path / "players.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))

    one = cli(tmp_path, "train", str(recipe), "--out", str(tmp_path / "one"), "-q")
    assert one.returncode == 0, one.stderr
    two = cli(tmp_path, "train", str(recipe), "--out", str(tmp_path / "two"), "-q", procs=2)
    assert two.returncode == 0, two.stderr
    d1, d2 = Path(one.stdout.strip().splitlines()[-1]), Path(two.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "two").iterdir())) == 1  # only rank 0 made a run folder
    s1, s2 = (json.loads((d / R.SUMMARY).read_text()) for d in (d1, d2))
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert s1["status"] == s2["status"] == "completed" and s1["steps"] == s2["steps"] == 2 * (448 // 32)

    # the same final metrics: losses to 1e-4 (another summation order), accuracies exactly
    f1, f2 = s1["final"], s2["final"]
    assert set(f1) == set(f2) == {"test/loss", "test/acc"}
    assert f1["test/loss"] == pytest.approx(f2["test/loss"], abs=1e-4)
    assert f1["test/acc"] == f2["test/acc"]
    assert f1["test/acc"] > 0.5  # it learned something: the comparison is not between two untrained models
    assert s1["best"]["value"] == s2["best"]["value"] and s1["best"]["step"] == s2["best"]["step"]
    # every logged value agrees along the way (the training losses are averaged over the shards)
    rows1, rows2 = R.read_metrics(d1), R.read_metrics(d2)
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    for a, b in zip(rows1, rows2, strict=True):
        for k in ("train/loss_head", "train/loss_features", "val/loss", "test/loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a["step"], k)
        for k in ("val/acc", "test/acc"):
            if k in a:
                assert a[k] == b[k], (a["step"], k)
    assert {"train/loss_head", "train/loss_features"} <= set(rows2[-3])

    # the same weights: each player's gradients were averaged over the processes before its step
    w1, w2 = (R.load_weights(d / R.CHECKPOINTS / "last") for d in (d1, d2))
    assert w1.keys() == w2.keys() == {"features.1.weight", "features.1.bias", "head.weight", "head.bias"}
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)

    # both optimizers' states (their momenta) are in the resume state
    for d in (d1, d2):
        st = R.load_train_state(d / R.CHECKPOINTS / "last")
        assert len(st["optimizer"]) == 2
        assert all(s["state"] and all("momentum_buffer" in v for v in s["state"].values()) for s in st["optimizer"])
        assert len(st["optimizer"][0]["state"]) == 2 and len(st["optimizer"][1]["state"]) == 2
        assert len(st["rng"]) == (1 if d == d1 else 2)  # the RNG of every process

    # the verbs of the distributed run through the CLI
    ev = cli(tmp_path, "eval", str(d2), "--split", "test", "--json")
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["split"] == "test" and res["checkpoint"] == "best"
    assert res["metrics"]["acc"] == f2["test/acc"]
    assert res["metrics"]["loss"] == pytest.approx(f2["test/loss"], abs=1e-6)

    from PIL import Image

    img = tmp_path / "pattern.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(img)
    pr = cli(tmp_path, "predict", str(d2), str(img), str(tmp_path / "missing.png"), "--json")
    assert pr.returncode == 2 and "1 of 2 inputs could not be read" in pr.stderr
    rows = [json.loads(line) for line in pr.stdout.splitlines()]
    assert rows[0]["input"] == str(img) and rows[0]["class"] in {f"class{i}" for i in range(4)}
    assert 0.25 <= rows[0]["prob"] <= 1.0
    assert "error" in rows[1] and "no such file" in rows[1]["error"]

    (d2 / R.REPORT).unlink()
    rep = cli(tmp_path, "report", str(d2))
    assert rep.returncode == 0, rep.stderr
    text = (d2 / R.REPORT).read_text()
    assert "## Players" in text and "| world_size | 2 |" in text and "test/acc" in text
