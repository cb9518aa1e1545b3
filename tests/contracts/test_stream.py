"""Contract: a family whose data is a token stream sampled by step (`nnlab.data.Windows`, no epochs) plugs in
from outside nnlab through the registries, and the supervised loop runs it by `train.max_steps` alone: without
it, one clear UserError; with it, step-wise evaluations monitored on a loss where LOWER is better (the best
checkpoint holds the lowest val/loss of a run whose val/loss bounces), `nnlab eval` reproduces the summary, the
report is written, and a run killed with SIGKILL resumes to exactly the metrics of an uninterrupted one.

The plugin is a module written into a temporary folder, so the real CLI in a subprocess imports it too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from harness import cli, comparable, kill_midway, plug, resume, run_dir

import nnlab
from nnlab import run as R
from nnlab.cli import main
from nnlab.errors import UserError

PLUGIN = '''
"""A token-stream family plugged into nnlab from outside: data sampled by step (Windows), a bigram LM, a task."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnlab.data import Batch, Spec, Windows, datasets, specs
from nnlab.models import models
from nnlab.tasks import TaskBase, tasks


@dataclass(kw_only=True)
class StreamSpec(Spec):
    kind: str = "plug_stream_tokens"
    vocab: int = 16
    inputs: ClassVar[str] = "text"

    def example(self, n):
        x = torch.randint(0, self.vocab, (n, 8))
        return Batch(x=x, y=x.roll(-1, 1))


if "plug_stream_tokens" not in specs:
    specs.register("plug_stream_tokens")(StreamSpec)


@dataclass
class StreamConfig:
    name: str = "plug_stream"
    vocab: int = 16
    block: int = 16
    n_train: int = 50_000
    n_eval: int = 4_096
    noise: float = 0.2  # chance that a token breaks the cycle
    seed: int = 0


def stream(vocab, n, noise, seed):
    """A fixed random cycle over the vocabulary (learnable: next = perm[prev]) with random tokens mixed in."""
    perm = np.random.default_rng(1234).permutation(vocab)
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    jumps, rand = rng.random(n) < noise, rng.integers(0, vocab, n)
    for i in range(1, n):
        out[i] = rand[i] if jumps[i] else perm[out[i - 1]]
    return out


class StreamData:
    def __init__(self, cfg):
        self.cfg, self.spec = cfg, StreamSpec(vocab=cfg.vocab)
        self.splits = ["train", "val", "test"]
        sizes = {"train": cfg.n_train, "val": cfg.n_eval, "test": cfg.n_eval}
        self.tokens = {s: stream(cfg.vocab, sizes[s], cfg.noise, cfg.seed * 10 + i)
                       for i, s in enumerate(self.splits)}

    def loader(self, split, batch_size, *, train=False, seed=0, rank=0, world=1, device="cpu"):
        return Windows(self.tokens[split], self.cfg.block, batch_size, train=train, seed=seed, rank=rank,
                       world=world, device=device)


if "plug_stream" not in datasets:
    datasets.register("plug_stream", config=StreamConfig)(StreamData)


@dataclass
class BigramConfig:
    name: str = "plug_bigram"
    dim: int = 32


class Bigram(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.emb(x))


if "plug_bigram" not in models:
    models.register("plug_bigram", config=BigramConfig, example=StreamSpec())(
        lambda cfg, spec: Bigram(spec.vocab, cfg.dim))


@dataclass
class LMConfig:
    name: str = "plug_lm"


class LM(TaskBase):
    monitor = "loss"

    def __init__(self, cfg, spec):
        self.spec = spec

    def step(self, model, batch):
        logits = model(batch["x"]).float()
        return {"loss": F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())}

    def eval_stats(self, model, batch, final=True):
        logits = model(batch["x"]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum")
        return {"nll": nll.double(), "tokens": torch.tensor(float(batch["y"].numel()), dtype=torch.float64)}

    def metrics(self, stats):
        loss = (stats["nll"] / stats["tokens"]).item()
        return {"loss": loss, "ppl": math.exp(loss)}


if "plug_lm" not in tasks:
    tasks.register("plug_lm", config=LMConfig)(lambda cfg, spec: LM(cfg, spec))
'''

STEPS, EVAL_EVERY = 400, 20
# a large constant learning rate: val/loss falls, then bounces, so the best evaluation is not the last one
RECIPE = {
    "name": "stream",
    "data": {"name": "plug_stream"},
    "model": {"name": "plug_bigram"},
    "task": {"name": "plug_lm"},
    "optim": {"name": "adamw", "lr": 0.3},
    "train": {"max_steps": STEPS, "eval_every_steps": EVAL_EVERY, "checkpoint_every": 10, "log_every": 10,
              "batch_size": 32, "schedule": "constant", "precision": "fp32", "threads": 1, "tensorboard": False},
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin module's folder, importable here (sys.path) and in subprocesses (PYTHONPATH)."""
    yield from plug(tmp_path_factory, "plug_stream", PLUGIN)


def test_a_stream_without_max_steps_is_a_clear_user_error(plugin: Path, tmp_path: Path, capsys) -> None:
    recipe = {**RECIPE, "train": {k: v for k, v in RECIPE["train"].items() if k != "max_steps"}}
    with pytest.raises(UserError, match=r"sampled by step and has no epochs: set train\.max_steps"):
        nnlab.train(recipe, out=tmp_path / "api", quiet=True, progress=False)
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "cli"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "set train.max_steps" in err and "Traceback" not in err
    for out in ("api", "cli"):  # refused before it began: no run folder is left behind
        assert not list((tmp_path / out).glob("stream-*")), out


def test_step_wise_run_keeps_the_lowest_loss_as_best(plugin: Path, tmp_path: Path) -> None:
    run = nnlab.train(RECIPE, out=tmp_path, quiet=True, progress=False)
    summary = run.summary
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    best = summary["best"]
    assert best["metric"] == "val/loss" and best["higher_is_better"] is False

    evals = [(r["step"], r["val/loss"]) for r in run.metrics if "val/loss" in r]
    assert [s for s, _ in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))  # by step, none doubled
    losses = [v for _, v in evals]
    assert any(b > a for a, b in zip(losses, losses[1:], strict=False)), "val/loss must bounce for this test"
    low_step, low = min(evals, key=lambda e: e[1])
    assert low_step != evals[-1][0]  # the lowest is not simply the last: the loop must pick it
    assert best["value"] == low and best["step"] == low_step
    assert max(losses) > low + 1e-3  # lower really is better here: the highest is a different evaluation

    meta = json.loads((run / R.CHECKPOINTS / "best" / R.MODEL_META).read_text())
    assert meta["step"] == low_step and meta["metrics"]["val/loss"] == low
    assert min(v for _, v in evals) == meta["metrics"]["val/loss"]
    assert json.loads((run / R.CHECKPOINTS / "last" / R.MODEL_META).read_text())["step"] == STEPS
    assert all(r["train/loss"] > 0 for r in run.metrics if "train/loss" in r)

    # the best checkpoint re-evaluated on val is the best value; on test, the summary's final metrics
    again = run.evaluate("val", "best")["metrics"]
    assert again["loss"] == pytest.approx(low, rel=1e-6)
    res = cli(plugin, "eval", str(run.path), "--split", "test", "--json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)["metrics"]
    assert set(run.final) == {"test/loss", "test/ppl"}
    for k, v in metrics.items():
        assert run.final[f"test/{k}"] == pytest.approx(v, rel=1e-6), k

    report = run / R.REPORT
    assert report.is_file() and "val/loss" in report.read_text() and (run / R.PLOTS / "curves.png").is_file()


def test_sigkill_then_resume_matches_uninterrupted(plugin: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "stream.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    ref_dir = run_dir(cli(plugin, "train", str(recipe), "--out", str(tmp_path / "ref"), "-q"))
    folder = kill_midway(plugin, recipe, tmp_path / "k", (15, STEPS // 2))
    resume(plugin, folder)
    a = json.loads((ref_dir / R.SUMMARY).read_text())
    b = json.loads((folder / R.SUMMARY).read_text())
    assert a["steps"] == b["steps"] == STEPS
    assert a["final"] == b["final"] and a["best"] == b["best"]
    assert comparable(ref_dir) == comparable(folder)
