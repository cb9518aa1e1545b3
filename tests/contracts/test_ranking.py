"""Contract: a metric that is not a sum. A detection-like family plugs in from outside nnlab: each example's
target is a list of 0..3 dicts (a `Batch` list field, one item per example), and the task's `eval_stats` returns
LISTS of per-example (score, is_positive) pairs, which the evaluation concatenates over batches and gathers from
every process, so `metrics` computes average precision over the whole split. Proven: 2 processes under torchrun
give the AP of 1 process (same global batch), the AP equals scikit-learn's over all examples and differs from
what per-batch APs would give, it does not depend on the evaluation batch size, and eval/predict/report work.

The plugin is a module written into a temporary folder, so the real CLI (and torchrun) in subprocesses import it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from harness import cli, plug
from sklearn.metrics import average_precision_score

import nnlab
from nnlab import run as R
from nnlab.cli import main

PLUGIN = '''
"""A detection-like family plugged into nnlab from outside: each example's target is a list of 0..3 dicts
{"label", "score_target"}; the task ranks (example, class) pairs and reports average precision (AP) over a
whole split, from per-example (score, is_positive) pairs gathered from every process."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnlab.data import Batch, Loader, Spec, datasets, specs
from nnlab.models import models
from nnlab.tasks import TaskBase, tasks


@dataclass(kw_only=True)
class RankSpec(Spec):
    kind: str = "plug_rank_vec"
    dim: int = 8
    num_classes: int = 5
    inputs: ClassVar[str] = "text"

    def encode(self, inputs):
        rows, errors = [], []
        for line in inputs:
            try:
                values = [float(v) for v in line.replace(",", " ").split()]
            except ValueError:
                errors.append(f"not a line of numbers: {line!r}")
                continue
            if len(values) != self.dim:
                errors.append(f"expected {self.dim} numbers, got {len(values)}")
                continue
            rows.append(values)
            errors.append(None)
        return (Batch(x=torch.tensor(rows, dtype=torch.float32)) if rows else None), errors

    def example(self, n):
        return Batch(x=torch.randn(n, self.dim), targets=[[] for _ in range(n)])


if "plug_rank_vec" not in specs:
    specs.register("plug_rank_vec")(RankSpec)


@dataclass
class RankDataConfig:
    name: str = "plug_rank"
    dim: int = 8
    classes: int = 5
    n_train: int = 256
    n_val: int = 128
    n_test: int = 200
    threshold: float = 3.0  # a class is present where its hidden score exceeds this (at most 3 per example)
    noise: float = 1.5
    seed: int = 0


class RankData:
    """Inputs x (dim,), targets: lists of 0..3 {"label": int, "score_target": float} (a Batch list field)."""

    def __init__(self, cfg):
        self.cfg, self.spec = cfg, RankSpec(dim=cfg.dim, num_classes=cfg.classes)
        g = torch.Generator().manual_seed(cfg.seed)
        sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
        w = torch.randn(cfg.classes, cfg.dim, generator=g)
        x = torch.randn(sum(sizes.values()), cfg.dim, generator=g)
        z = x @ w.T + cfg.noise * torch.randn(len(x), cfg.classes, generator=g)
        targets = []
        for row in z.tolist():
            present = sorted((c for c in range(cfg.classes) if row[c] > cfg.threshold), key=lambda c: -row[c])[:3]
            targets.append([{"label": c, "score_target": 1.0 - 0.1 * r} for r, c in enumerate(present)])
        self.splits, self.data, start = list(sizes), {}, 0
        for s, n in sizes.items():
            self.data[s] = (x[start:start + n], targets[start:start + n])
            start += n

    def loader(self, split, batch_size, *, train=False, seed=0, rank=0, world=1, device="cpu"):
        x, targets = self.data[split]

        def make(idx, epoch, gen):
            return Batch(x=x[idx.cpu()], targets=[targets[i] for i in idx.tolist()])

        return Loader(len(x), batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device)


if "plug_rank" not in datasets:
    datasets.register("plug_rank", config=RankDataConfig)(RankData)


@dataclass
class RankMLPConfig:
    name: str = "plug_rank_mlp"
    hidden: int = 16


if "plug_rank_mlp" not in models:
    models.register("plug_rank_mlp", config=RankMLPConfig, example=RankSpec())(
        lambda cfg, spec: nn.Sequential(nn.Linear(spec.dim, cfg.hidden), nn.ReLU(),
                                        nn.Linear(cfg.hidden, spec.num_classes)))


def average_precision(scores, positive) -> float:
    """AP as the step sum over distinct score thresholds (scikit-learn's definition); 0 without positives."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=np.float64)
    if not y.sum():
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last item of each run of equal scores
    tps = np.cumsum(y)[last]
    precision, recall = tps / (last + 1), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass
class RankTaskConfig:
    name: str = "plug_rank_ap"
    threshold: float = 0.5  # predict: the classes scored above this


class RankAP(TaskBase):
    monitor = "ap"

    def __init__(self, cfg, spec):
        self.cfg, self.spec = cfg, spec

    def soft_targets(self, targets, like):
        t = torch.zeros_like(like)
        for i, items in enumerate(targets):
            for d in items:
                t[i, d["label"]] = d["score_target"]
        return t

    def step(self, model, batch):
        logits = model(batch["x"]).float()
        return {"loss": F.binary_cross_entropy_with_logits(logits, self.soft_targets(batch["targets"], logits))}

    def eval_stats(self, model, batch, final=True):
        logits = model(batch["x"]).float()
        loss = F.binary_cross_entropy_with_logits(logits, self.soft_targets(batch["targets"], logits),
                                                  reduction="sum")
        scores = logits.sigmoid().cpu().tolist()
        pairs = [[(s, any(d["label"] == c for d in items)) for c, s in enumerate(row)]
                 for row, items in zip(scores, batch["targets"], strict=True)]
        return {"pairs": pairs, "loss_sum": loss.double(),
                "cells": torch.tensor(float(logits.numel()), dtype=torch.float64)}

    def metrics(self, stats):
        flat = [p for example in stats["pairs"] for p in example]
        return {"loss": (stats["loss_sum"] / stats["cells"]).item(),
                "ap": average_precision([s for s, _ in flat], [y for _, y in flat]),
                "examples": float(len(stats["pairs"])), "positives": float(sum(y for _, y in flat))}

    def describe(self, stats):
        m = self.metrics(stats)
        return f"AP {m['ap']:.4f} over {int(m['examples'])} examples ({int(m['positives'])} positive pairs)"

    def summary(self, stats):
        return {"examples": {split: len(s["pairs"]) for split, s in stats.items()}}

    def report(self, folder, summary, model, data):
        return ["", "## Ranking", "", *(f"- {k}: AP {v:.4f}" for k, v in summary.get("final", {}).items()
                                         if k.endswith("/ap"))]

    @torch.no_grad()
    def predict(self, model, inputs, top=1):
        batch, errors = self.spec.encode(inputs)
        rows = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            scores = model.eval()(batch["x"].to(next(model.parameters()).device)).sigmoid().cpu()
            good = [r for r in rows if "error" not in r]
            for row, s in zip(good, scores, strict=True):
                p, idx = s.topk(min(top, len(s)))
                row |= {"class": int(idx[0]), "score": float(p[0]),
                        "labels": [c for c, v in enumerate(s.tolist()) if v > self.cfg.threshold]}
                if top > 1:
                    row["top"] = [[int(i), float(q)] for i, q in zip(idx, p, strict=True)]
        return rows


if "plug_rank_ap" not in tasks:
    tasks.register("plug_rank_ap", config=RankTaskConfig)(lambda cfg, spec: RankAP(cfg, spec))
'''

EVAL_BATCH = 50
RECIPE = {
    "name": "rank",
    "data": {"name": "plug_rank"},
    "model": {"name": "plug_rank_mlp"},  # no dropout, no batch norm: 2 processes can match 1
    "task": {"name": "plug_rank_ap"},
    "optim": {"name": "adamw", "lr": 1e-2},
    "train": {"epochs": 6, "batch_size": 32, "eval_batch_size": EVAL_BATCH, "schedule": "constant",
              "precision": "fp32", "threads": 1, "tensorboard": False, "log_every": 4},
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin's folder (with runner.py, the CLI after importing it), importable here and in subprocesses."""
    yield from plug(tmp_path_factory, "plug_rank", PLUGIN)


@pytest.fixture(scope="module")
def trained(plugin: Path, tmp_path_factory: pytest.TempPathFactory):
    return nnlab.train(RECIPE, out=tmp_path_factory.mktemp("rank_runs"), quiet=True, progress=False)


def summary(folder: str | Path) -> dict:
    return json.loads((Path(folder) / R.SUMMARY).read_text())


def close(a: dict, b: dict) -> None:
    """Losses to 1e-4 (gradients are summed in another order), AP to 1e-6, counts exactly."""
    assert a.keys() == b.keys()
    for k in a:
        tol = 1e-4 if k.endswith("loss") else 1e-6 if k.endswith("ap") else 0
        assert a[k] == pytest.approx(b[k], abs=tol), k


def split_pairs(run, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and positives of every (example, class) pair of `split`, from the run's best model alone."""
    import plug_rank

    loaded = nnlab.load_model(run)
    x, targets = plug_rank.RankData(plug_rank.RankDataConfig()).data[split]
    with torch.no_grad():
        scores = loaded.model(x).sigmoid().numpy()
    positive = np.zeros_like(scores, dtype=bool)
    for i, items in enumerate(targets):
        for d in items:
            positive[i, d["label"]] = True
    return scores, positive, len(targets)


def test_two_processes_give_the_ap_of_one(plugin: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "rank.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    one = cli(plugin, "train", str(recipe), "--out", str(tmp_path / "one"), "-q")
    assert one.returncode == 0, one.stderr
    two = cli(plugin, "train", str(recipe), "--out", str(tmp_path / "two"), "-q", procs=2)
    assert two.returncode == 0, two.stderr
    assert len(list((tmp_path / "two").iterdir())) == 1  # rank 0 alone writes
    d1, d2 = one.stdout.strip().splitlines()[-1], two.stdout.strip().splitlines()[-1]
    s1, s2 = summary(d1), summary(d2)
    assert s1["world_size"] == 1 and s2["world_size"] == 2 and s1["steps"] == s2["steps"] > 0
    close(s1["final"], s2["final"])
    # the lists were gathered from both processes: the AP is over all 200 test examples, not rank 0's half
    assert s2["final"]["test/examples"] == 200 and s2["task"] == {"examples": {"test": 200}}
    assert s1["best"]["metric"] == s2["best"]["metric"] == "val/ap" and s2["best"]["higher_is_better"] is True
    assert s1["best"]["step"] == s2["best"]["step"]
    assert s1["best"]["value"] == pytest.approx(s2["best"]["value"], abs=1e-6)
    evals1 = [r["val/ap"] for r in R.read_metrics(d1) if "val/ap" in r]
    evals2 = [r["val/ap"] for r in R.read_metrics(d2) if "val/ap" in r]
    assert len(evals1) == len(evals2) == RECIPE["train"]["epochs"]
    assert evals2 == pytest.approx(evals1, abs=1e-6)
    assert len(set(evals1)) > 1  # the model learned something: AP moved
    # the distributed run's best checkpoint, re-evaluated by one process: the same AP as its summary
    res = cli(plugin, "eval", d2, "--split", "test", "--json")
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)["metrics"]
    close(s2["final"], {f"test/{k}": v for k, v in again.items()})


def test_ap_is_over_the_whole_gathered_split(trained, capsys) -> None:
    run = trained
    capsys.readouterr()
    assert main(["eval", str(run.path), "--split", "test", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ap = res["metrics"]["ap"]
    assert res["metrics"]["examples"] == 200 and "over 200 examples" in res["details"]
    assert ap == pytest.approx(run.final["test/ap"], abs=1e-9)

    scores, positive, n = split_pairs(run, "test")
    lengths = positive.sum(1)
    assert set(lengths.tolist()) == {0, 1, 2, 3}  # targets of varying length, empty ones included
    assert res["metrics"]["positives"] == positive.sum()
    whole = average_precision_score(positive.ravel(), scores.ravel())
    assert ap == pytest.approx(whole, abs=1e-9)
    assert 0.3 < ap < 0.999  # learned, but not trivially perfect: the ranking is what is measured

    # what summing (or averaging) per-batch APs over the evaluation batches would give: not the AP
    per_batch = [average_precision_score(positive[i:i + EVAL_BATCH].ravel(), scores[i:i + EVAL_BATCH].ravel())
                 for i in range(0, n, EVAL_BATCH)]
    assert len(per_batch) == 4
    assert abs(float(np.mean(per_batch)) - ap) > 1e-3 and abs(sum(per_batch) - ap) > 1e-3
    # and the AP does not depend on how the split is batched (7 does not divide 200)
    for size in (7, 200):
        other = run.evaluate("test", "best", (f"train.eval_batch_size={size}",))["metrics"]
        assert other["ap"] == pytest.approx(ap, abs=1e-9) and other["examples"] == 200, size


def test_predict_and_report_work_on_the_run(trained, tmp_path: Path, capsys) -> None:
    run = trained
    good = " ".join(["0.5"] * 8)
    capsys.readouterr()
    assert main(["predict", str(run.path), "--text", good, "--text", "1 2", "--text", "a b", "--json"]) == 2
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in rows] == [good, "1 2", "a b"]
    assert "expected 8 numbers, got 2" in rows[1]["error"] and "not a line of numbers" in rows[2]["error"]
    assert "2 of 3 inputs could not be read" in err
    with torch.no_grad():
        expected = torch.sigmoid(nnlab.load_model(run).model(torch.full((1, 8), 0.5)))[0]
    assert rows[0]["class"] == int(expected.argmax()) and rows[0]["score"] == pytest.approx(float(expected.max()))
    assert rows[0]["labels"] == [c for c, v in enumerate(expected.tolist()) if v > 0.5]

    lines = tmp_path / "inputs.txt"
    lines.write_text(f"{good}\n\n{' '.join(['-1'] * 8)}\n")
    rows = run.predict([lines], top=3)
    assert len(rows) == 2 and all("error" not in r for r in rows)
    for r in rows:
        assert len(r["top"]) == 3 and r["top"][0] == [r["class"], r["score"]]
        assert [s for _, s in r["top"]] == sorted((s for _, s in r["top"]), reverse=True)

    report = run / R.REPORT
    report.unlink()
    assert main(["report", str(run.path)]) == 0
    assert capsys.readouterr().out.strip() == str(report)
    text = report.read_text()
    assert "## Ranking" in text and f"- test/ap: AP {run.final['test/ap']:.4f}" in text
    assert "## Final metrics" in text and (run / R.PLOTS / "curves.png").is_file()
