"""Contract: a dataset larger than the memory a run is allowed. A 1 GiB token file (uint16, nanoGPT's format)
is memory-mapped by a dataset registered from this file and sampled lazily by `nnlab.data.Windows`; the real
CLI runs in a subprocess whose data segment is capped below the file's size (RLIMIT_DATA, which counts what a
process allocates, not the read-only file mapping). Under that cap: reading the file into memory fails (the
control: the cap bites), while training, `eval`, `predict` and `report` succeed, and a run killed with SIGKILL
resumes to exactly the metrics of an uninterrupted one.

The plugin is a module written into a temporary folder, so the real CLI in a subprocess imports it too."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import harness as H
import numpy as np
import pytest
import yaml
from harness import comparable, install, kill_midway, resume, run_dir

from nnlab import run as R

PLUGIN = '''
"""A token file on disk, memory-mapped (never read whole), split by position; a bigram LM that predicts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnlab.data import Batch, Spec, Windows, datasets, specs
from nnlab.errors import UserError
from nnlab.models import models
from nnlab.tasks import TaskBase, tasks


@dataclass(kw_only=True)
class MapSpec(Spec):
    kind: str = "plug_map_tokens"
    vocab: int = 64
    inputs: ClassVar[str] = "text"

    def encode(self, inputs):
        rows, errors = [], []
        for line in inputs:
            try:
                ids = [int(w) for w in line.split()]
                if not ids or not all(0 <= i < self.vocab for i in ids):
                    raise ValueError
            except ValueError:
                errors.append(f"not token ids in 0..{self.vocab - 1}: {line!r}")
                continue
            rows.append(ids[-1])
            errors.append(None)
        return (Batch(x=torch.tensor(rows)[:, None]) if rows else None), errors

    def example(self, n):
        x = torch.randint(0, self.vocab, (n, 8))
        return Batch(x=x, y=x.roll(-1, 1))


if "plug_map_tokens" not in specs:
    specs.register("plug_map_tokens")(MapSpec)


@dataclass
class MapConfig:
    name: str = "plug_map"
    path: str = ""  # the uint16 token file
    vocab: int = 64
    block: int = 32
    eval_tokens: int = 65_536  # the last 2 x this many tokens are val, then test
    eval_windows: int = 32


class MapData:
    def __init__(self, cfg):
        try:
            tokens = np.memmap(cfg.path, dtype=np.uint16, mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"data.path: cannot map token file '{cfg.path}' ({e})") from None
        self.cfg, self.spec, self.splits = cfg, MapSpec(vocab=cfg.vocab), ["train", "val", "test"]
        n, e = len(tokens), cfg.eval_tokens
        self.tokens = {"train": tokens[:n - 2 * e], "val": tokens[n - 2 * e:n - e], "test": tokens[n - e:]}

    def loader(self, split, batch_size, *, train=False, seed=0, rank=0, world=1, device="cpu"):
        return Windows(self.tokens[split], self.cfg.block, batch_size, train=train, seed=seed, rank=rank,
                       world=world, device=device, eval_windows=0 if train else self.cfg.eval_windows)


if "plug_map" not in datasets:
    datasets.register("plug_map", config=MapConfig)(MapData)


@dataclass
class BigramConfig:
    name: str = "plug_map_bigram"


if "plug_map_bigram" not in models:
    models.register("plug_map_bigram", config=BigramConfig, example=MapSpec())(
        lambda cfg, spec: nn.Embedding(spec.vocab, spec.vocab))


@dataclass
class NextConfig:
    name: str = "plug_next"


class Next(TaskBase):
    monitor = "loss"

    def __init__(self, cfg, spec):
        self.spec = spec

    def step(self, model, batch):
        return {"loss": F.cross_entropy(model(batch["x"]).flatten(0, 1).float(), batch["y"].flatten())}

    def eval_stats(self, model, batch, final=True):
        logits = model(batch["x"]).flatten(0, 1).float()
        y = batch["y"].flatten()
        return {"nll": F.cross_entropy(logits, y, reduction="sum").double(), "correct": (logits.argmax(1) == y).sum(),
                "tokens": torch.tensor(y.numel())}

    def metrics(self, stats):
        n = max(int(stats["tokens"]), 1)
        return {"loss": float(stats["nll"]) / n, "acc": int(stats["correct"]) / n}

    @torch.no_grad()
    def predict(self, model, inputs, top=1):
        batch, errors = self.spec.encode(inputs)
        rows = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            p = model(batch["x"])[:, -1].float().softmax(-1)
            for row, pi in zip([r for r in rows if "error" not in r], p, strict=True):
                row |= {"next": int(pi.argmax()), "prob": float(pi.max())}
        return rows


if "plug_next" not in tasks:
    tasks.register("plug_next", config=NextConfig)(lambda cfg, spec: Next(cfg, spec))
'''

VOCAB, FILE_TOKENS = 64, 512 * 2**20  # 1 GiB of uint16
CAP = 768 * 2**20  # the data segment a run may have: less than the file
STEPS = 300
RECIPE = {
    "name": "map",
    "data": {"name": "plug_map"},
    "model": {"name": "plug_map_bigram"},
    "task": {"name": "plug_next"},
    "optim": {"name": "adamw", "lr": 0.1, "weight_decay": 0.0},
    "train": {"max_steps": STEPS, "eval_every_steps": 50, "checkpoint_every": 10, "log_every": 10, "batch_size": 16,
              "precision": "fp32", "threads": 1, "tensorboard": False},
}


def capped() -> None:  # in the child, before it runs: the cap on what it may allocate
    resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(plugin folder, token file): the file is a cycle next = (5 * prev + 1) % 64 written in 64 MiB pieces,
    with every 8th token random, so a bigram model has something to learn."""
    folder = install(tmp_path_factory.mktemp("plug_map"), "plug_map", PLUGIN)
    path = folder / "tokens.bin"
    cycle = np.zeros(VOCAB, dtype=np.uint16)
    for i in range(1, VOCAB):
        cycle[i] = (5 * cycle[i - 1] + 1) % VOCAB
    piece = np.tile(cycle, 2**25 // VOCAB)  # 32M tokens: 64 MiB
    piece[::8] = np.random.default_rng(0).integers(0, VOCAB, len(piece[::8]), dtype=np.uint16)
    with path.open("wb") as f:
        for _ in range(FILE_TOKENS // len(piece)):
            f.write(piece.tobytes())
    assert path.stat().st_size == 2**30 > CAP
    yield folder, path
    path.unlink()


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The real CLI in a capped subprocess that imported the plugin first."""
    return H.cli(folder, *args, timeout=180, preexec_fn=capped)


def recipe(tmp_path: Path, path: Path) -> Path:
    f = tmp_path / "map.yaml"
    f.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "path": str(path)}}))
    return f


def test_the_cap_is_below_what_reading_the_file_needs(world: tuple[Path, Path]) -> None:
    folder, path = world
    code = f"import numpy as np\ntry:\n    np.fromfile({str(path)!r}, dtype=np.uint16)\nexcept MemoryError:\n" \
           f"    raise SystemExit(3)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=capped)
    assert res.returncode == 3, (res.returncode, res.stderr)  # loaded whole, it does not fit


def test_a_memory_mapped_file_larger_than_the_cap_trains_evaluates_and_predicts(world, tmp_path: Path) -> None:
    folder, path = world
    res = cli(folder, "train", str(recipe(tmp_path, path)), "--out", str(tmp_path / "runs"), "-q")
    assert res.returncode == 0, res.stderr
    run = Path(res.stdout.strip().splitlines()[-1])
    summary = json.loads((run / R.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["best"]["metric"] == "val/loss" and summary["best"]["higher_is_better"] is False
    # 7 tokens in 8 follow the cycle: a bigram model learned it
    assert summary["final"]["test/acc"] > 0.7 and summary["final"]["test/loss"] < 1.5

    ev = cli(folder, "eval", str(run), "--json")
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)["metrics"]
    assert {f"test/{k}": v for k, v in metrics.items()} == pytest.approx(summary["final"], rel=1e-6)

    pr = cli(folder, "predict", str(run), "--text", "0 1", "--text", "6", "--text", "x", "--json")
    assert pr.returncode == 2 and "1 of 3 inputs could not be read" in pr.stderr
    rows = [json.loads(line) for line in pr.stdout.splitlines()]
    assert rows[0]["next"] == 6 and rows[1]["next"] == 31  # 5 * 1 + 1, 5 * 6 + 1
    assert "not token ids" in rows[2]["error"]

    (run / R.REPORT).unlink()
    rep = cli(folder, "report", str(run))
    assert rep.returncode == 0, rep.stderr
    assert "test/loss" in (run / R.REPORT).read_text()


def test_sigkill_then_resume_matches_uninterrupted(world, tmp_path: Path) -> None:
    folder, path = world
    f = recipe(tmp_path, path)
    ref_dir = run_dir(cli(folder, "train", str(f), "--out", str(tmp_path / "ref"), "-q"))
    run = kill_midway(folder, f, tmp_path / "k", (15, STEPS // 2), preexec_fn=capped)
    resume(folder, run, preexec_fn=capped)
    a, b = (json.loads((d / R.SUMMARY).read_text()) for d in (ref_dir, run))
    assert a["steps"] == b["steps"] == STEPS and a["final"] == b["final"] and a["best"] == b["best"]
    assert comparable(ref_dir) == comparable(run)
