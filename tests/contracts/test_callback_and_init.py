"""Contract: from Python, what a search and a fine-tune need. A family of vectors (its own spec kind, dataset,
model and task, registered from this file) trains through `nnlab.train`:
- `on_eval(step, metrics)` sees every evaluation, in step with metrics.jsonl; returning True stops the run
  (status `stopped`, the reason named, the final test metrics still computed from the best checkpoint); an
  exception raised in it (Optuna's `TrialPruned`) reaches the caller unchanged, and the run resumes later;
- `init.from=RUN` starts a run from another run's weights: tensors of the same name and shape are copied, a
  head for another number of classes is new, tensors this model lacks are skipped; the loaded/new/skipped
  table is printed and saved as init.json; a bad source is one clear error (exit 2), and no run folder is
  left behind by a run that was refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import plug

import nnlab
from nnlab import run as R
from nnlab.cli import main
from nnlab.errors import UserError

PLUGIN = '''
"""Gaussian blobs in `dim` dimensions, one per class; a two-layer net with an optional projection."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nnlab.data import Batch, Spec, TensorData, datasets, specs
from nnlab.models import models
from nnlab.tasks import TaskBase, tasks


@dataclass(kw_only=True)
class VectorSpec(Spec):
    kind: str = "plug_vectors"
    dim: int = 8
    classes: list[str] = field(default_factory=lambda: ["c0", "c1"])

    def example(self, n):
        return Batch(x=torch.randn(n, self.dim), y=torch.randint(0, len(self.classes), (n,)))


if "plug_vectors" not in specs:
    specs.register("plug_vectors")(VectorSpec)


@dataclass
class BlobsConfig:
    name: str = "plug_blobs"
    dim: int = 8
    classes: int = 3
    n_train: int = 384
    n_eval: int = 128
    spread: float = 1.5
    seed: int = 0


def blobs(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(cfg.classes, cfg.dim, generator=torch.Generator().manual_seed(99)) * cfg.spread
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    return {"x": centres[y] + torch.randn(n, cfg.dim, generator=g), "y": y}


def make_blobs(cfg):
    spec = VectorSpec(dim=cfg.dim, classes=[f"c{i}" for i in range(cfg.classes)])
    return TensorData(spec, {"train": blobs(cfg, cfg.n_train, cfg.seed * 3 + 1),
                             "val": blobs(cfg, cfg.n_eval, cfg.seed * 3 + 2),
                             "test": blobs(cfg, cfg.n_eval, cfg.seed * 3 + 3)})


if "plug_blobs" not in datasets:
    datasets.register("plug_blobs", config=BlobsConfig)(make_blobs)


@dataclass
class NetConfig:
    name: str = "plug_net"
    hidden: int = 16
    proj: bool = False  # an extra hidden layer (a tensor a run without it does not have)


class Net(nn.Module):
    def __init__(self, cfg, spec):
        super().__init__()
        self.features = nn.Linear(spec.dim, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden) if cfg.proj else None
        self.head = nn.Linear(cfg.hidden, len(spec.classes))

    def forward(self, x):
        h = torch.relu(self.features(x))
        if self.proj is not None:
            h = torch.relu(self.proj(h))
        return self.head(h)


if "plug_net" not in models:
    models.register("plug_net", config=NetConfig, example=VectorSpec())(lambda cfg, spec: Net(cfg, spec))


@dataclass
class PickConfig:
    name: str = "plug_pick"


class Pick(TaskBase):
    monitor = "acc"

    def __init__(self, cfg, spec):
        self.spec = spec

    def step(self, model, batch):
        logits = model(batch["x"]).float()
        return {"loss": F.cross_entropy(logits, batch["y"]), "acc": (logits.argmax(1) == batch["y"]).float().mean()}

    def eval_stats(self, model, batch, final=True):
        logits = model(batch["x"]).float()
        return {"loss_sum": F.cross_entropy(logits, batch["y"], reduction="sum").double(),
                "correct": (logits.argmax(1) == batch["y"]).sum(), "n": torch.tensor(len(batch))}

    def metrics(self, stats):
        n = max(int(stats["n"]), 1)
        return {"loss": float(stats["loss_sum"]) / n, "acc": int(stats["correct"]) / n}


if "plug_pick" not in tasks:
    tasks.register("plug_pick", config=PickConfig)(lambda cfg, spec: Pick(cfg, spec))
'''

EPOCHS, STEPS_PER_EPOCH = 8, 384 // 32
RECIPE = {
    "name": "blobs",
    "data": {"name": "plug_blobs"},
    "model": {"name": "plug_net"},
    "task": {"name": "plug_pick"},
    "optim": {"name": "adamw", "lr": 0.01},
    "train": {"epochs": EPOCHS, "batch_size": 32, "log_every": 4, "precision": "fp32", "threads": 1,
              "tensorboard": False},
}


class Pruned(Exception):
    """As optuna.TrialPruned: raised by a callback to abandon a trial."""


@pytest.fixture(scope="module", autouse=True)
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    yield from plug(tmp_path_factory, "plug_blobs", PLUGIN)  # registers the family in this process


def test_the_evaluation_callback_sees_every_evaluation_and_stops_the_run(tmp_path: Path) -> None:
    seen: list[tuple[int, dict]] = []

    def on_eval(step: int, metrics: dict) -> bool:
        seen.append((step, dict(metrics)))
        metrics.clear()  # the callback gets a copy: nothing it does changes the run's records
        return len(seen) == 3

    run = nnlab.train(RECIPE, out=tmp_path, quiet=True, progress=False, on_eval=on_eval)
    s = run.summary
    assert s["status"] == "stopped" and s["stop_reason"] == "the evaluation callback asked to stop"
    assert s["steps"] == 3 * STEPS_PER_EPOCH and s["epochs"] == 3  # stopped after the third epoch's evaluation
    assert [step for step, _ in seen] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    evals = [r for r in run.metrics if "val/acc" in r]
    assert [(r["step"], {"val/loss": r["val/loss"], "val/acc": r["val/acc"]}) for r in evals] == seen
    # the final metrics are still computed, with the best checkpoint
    assert set(run.final) == {"test/loss", "test/acc"} and run.final["test/acc"] > 0.6
    best = max(seen, key=lambda e: e[1]["val/acc"])  # (the first of equal ones)
    assert s["best"]["step"] == best[0] and s["best"]["value"] == best[1]["val/acc"]
    assert R.read_meta(run / R.CHECKPOINTS / "last")["step"] == 3 * STEPS_PER_EPOCH
    assert run.evaluate("test")["metrics"] == {k.split("/")[1]: v for k, v in run.final.items()}

    # without a callback (or one that never says stop) the same recipe runs to the end
    full = nnlab.train(RECIPE, ["train.epochs=4"], out=tmp_path / "full", quiet=True, progress=False,
                       on_eval=lambda step, metrics: None)
    assert full.summary["status"] == "completed" and full.summary["steps"] == 4 * STEPS_PER_EPOCH


def test_an_exception_in_the_callback_reaches_the_caller_and_the_run_resumes(tmp_path: Path) -> None:
    def prune(step: int, metrics: dict) -> None:
        if step == 2 * STEPS_PER_EPOCH:
            raise Pruned(f"pruned at step {step}")

    with pytest.raises(Pruned, match="pruned at step 24"):
        nnlab.train(RECIPE, out=tmp_path, quiet=True, progress=False, on_eval=prune)
    (folder,) = tmp_path.glob("blobs-*")
    assert not (folder / R.SUMMARY).exists()  # abandoned, not finished
    assert R.read_metrics(folder)[-1]["step"] == 2 * STEPS_PER_EPOCH

    run = nnlab.resume(folder, quiet=True, progress=False)
    ref = nnlab.train(RECIPE, out=tmp_path / "ref", quiet=True, progress=False)
    assert run.summary["status"] == "completed" and run.summary["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert run.final == ref.final and run.summary["best"] == ref.summary["best"]


def test_init_from_another_run_copies_what_fits_and_makes_a_new_head(tmp_path: Path, capsys) -> None:
    source = nnlab.train(RECIPE, ["model.proj=true"], out=tmp_path / "src", quiet=True, progress=False)
    assert source.final["test/acc"] > 0.8
    theirs = R.load_weights(source / R.CHECKPOINTS / "best")

    # 5 classes instead of 3, no projection; one tiny step, so the weights are still the copied ones
    capsys.readouterr()
    run = nnlab.train(RECIPE, [f"init.from={source.path}", "data.classes=5", "train.max_steps=1",
                               "optim.lr=1e-8", "optim.weight_decay=0"], out=tmp_path / "dst", quiet=True)
    printed = capsys.readouterr().err
    table = json.loads((run / R.INIT).read_text())
    assert table == {
        "source": str(source / R.CHECKPOINTS / "best"),
        "loaded": ["features.weight", "features.bias"],
        "new": ["head.weight (3, 16)->(5, 16)", "head.bias (3,)->(5,)"],
        "skipped": ["proj.bias", "proj.weight"],  # in the order of the source file
    }
    assert (f"init.from {table['source']}: 2 tensors loaded, 2 new (head.weight (3, 16)->(5, 16), "
            f"head.bias (3,)->(5,)), 2 skipped (proj.bias, proj.weight)") in printed
    mine = R.load_weights(run / R.CHECKPOINTS / "last")
    for k in ("features.weight", "features.bias"):
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    assert mine["head.weight"].shape == (5, 16) and "proj.weight" not in mine
    cfg = R.read_config(run.path)
    assert cfg["init"] == {"from": str(source.path), "checkpoint": "best"}  # the config says where it started
    assert R.read_meta(run / R.CHECKPOINTS / "last")["spec"]["classes"] == ["c0", "c1", "c2", "c3", "c4"]

    # the same model started from scratch is not the source's
    fresh = nnlab.train(RECIPE, ["data.classes=5", "train.max_steps=1"], out=tmp_path / "fresh", quiet=True,
                        progress=False)
    assert not torch.allclose(R.load_weights(fresh / R.CHECKPOINTS / "last")["features.weight"],
                              theirs["features.weight"], atol=1e-2)

    # a fine-tune from `last`, and the whole of it trained: it learns the 5 classes
    tuned = nnlab.train(RECIPE, [f"init.from={source.path}", "init.checkpoint=last", "data.classes=5"],
                        out=tmp_path / "dst", quiet=True, progress=False)
    assert json.loads((tuned / R.INIT).read_text())["source"] == str(source / R.CHECKPOINTS / "last")
    assert tuned.final["test/acc"] > 0.6


def test_bad_init_sources_are_one_clear_error_and_leave_no_run_folder(tmp_path: Path, capsys) -> None:
    other = nnlab.train({**RECIPE, "name": "other"}, ["model.hidden=4"], out=tmp_path / "src", quiet=True,
                        progress=False)
    foreign = tmp_path / "foreign"  # a run of another model family: no tensor name in common
    foreign.mkdir()
    (foreign / R.CONFIG).write_text("name: x\n")
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    out = tmp_path / "out"
    cases = [
        (f"init.from={tmp_path / 'nope'}", f"init.from={tmp_path / 'nope'}: run folder '{tmp_path / 'nope'}' "
                                           "does not exist"),
        (f"init.from={not_a_run}", "is not an nnlab run folder"),
        (f"init.from={foreign}", f"init.from={foreign}: run '{foreign}' has no checkpoint yet"),
        ("init.checkpoint=bset", "bad value for config key 'init.checkpoint'"),
        ("init.frm=x", "unknown config key 'init.frm' (did you mean 'from'?)"),
    ]
    recipe = tmp_path / "blobs.yaml"
    recipe.write_text(json.dumps(RECIPE))  # JSON is YAML
    for override, message in cases:
        capsys.readouterr()
        assert main(["train", str(recipe), "--out", str(out), "-q", override]) == 2, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (override, err)
    # weights of another shape everywhere (hidden 4 against 16, 3 classes against 2): nothing fits
    with pytest.raises(UserError, match=r"no tensor of .* fits this model \(mismatching: features.weight "):
        nnlab.train(RECIPE, [f"init.from={other.path}", "data.classes=2"], out=out, quiet=True, progress=False)
    assert not out.exists() or not any(out.iterdir())  # every refused run left nothing behind
