"""Contract: a text family with variable-length token sequences plugs in from outside nnlab through the public
registries. Its dataset fits a word vocabulary on the train split only and stores it as a run asset
(`spec.assets["vocab.json"]` -> checkpoints/*/assets/vocab.json, restored by `load_model`); its loader is a
`nnlab.data.Loader` with `lengths` + `bucket` whose `make` pads each global batch with `nnlab.data.pad` and a mask;
its spec has `inputs = "text"`, so `nnlab predict` reads raw text lines through `Spec.encode` (unknown words -> an
unk id). The run folder is complete, `nnlab eval` reproduces the summary's final metrics, and a run killed with
SIGKILL resumes to exactly the metrics of an uninterrupted one.

The plugin is a module written into a temporary folder, so the real CLI in a subprocess imports it too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from harness import cli, comparable, kill_midway, plug, resume, run_dir

import nnlab
from nnlab import run as R

PLUGIN = '''
"""A text family plugged into nnlab from outside: two word pools, a train-split vocabulary, padded batches."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnlab.data import Batch, Loader, Spec, datasets, pad, specs
from nnlab.models import models
from nnlab.tasks import TaskBase, tasks

PAD, UNK = "<pad>", "<unk>"
POOLS = {"A": [f"apple{i}" for i in range(25)], "B": [f"brick{i}" for i in range(25)]}
SHARED = ["the", "a", "of", "and", "to"]  # in sentences of both classes: no clue to the label
TRAIN_WORDS = 20  # the train split uses each pool's first 20 words; val and test all 25 (5 never seen in train)


@dataclass(kw_only=True)
class TokenSpec(Spec):
    kind: str = "plug_tokens"
    vocab_size: int = 2
    classes: list[str] = field(default_factory=lambda: ["A", "B"])
    inputs: ClassVar[str] = "text"

    def vocab(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(json.loads(self.assets["vocab.json"]))}

    def ids(self, line: str, vocab: dict[str, int]) -> torch.Tensor:
        return torch.tensor([vocab.get(w, vocab[UNK]) for w in line.lower().split()], dtype=torch.long)

    def encode(self, inputs):
        vocab = self.vocab()
        seqs, errors = [], []
        for line in inputs:
            if not line.split():
                errors.append("empty text: no words to classify")
                continue
            seqs.append(self.ids(line, vocab))
            errors.append(None)
        if not seqs:
            return None, errors
        ids, mask = pad(seqs, vocab[PAD])
        return Batch(ids=ids, mask=mask), errors

    def example(self, n):
        ids, mask = pad([torch.randint(0, self.vocab_size, (k,)) for k in range(1, n + 1)])
        return Batch(ids=ids, mask=mask, y=torch.randint(0, len(self.classes), (n,)))


if "plug_tokens" not in specs:
    specs.register("plug_tokens")(TokenSpec)


@dataclass
class TokensConfig:
    name: str = "plug_tokens"
    n_train: int = 400
    n_val: int = 100
    n_test: int = 100
    min_len: int = 3
    max_len: int = 14
    noise: float = 0.4  # chance that a word comes from the shared pool
    bucket: int = 4  # sort runs of this many batches by length (0: off)
    seed: int = 0


def sentences(cfg: TokensConfig, split: str) -> tuple[list[str], list[int]]:
    """Raw text lines and labels (0: pool A, 1: pool B) of a split, a function of (seed, split) alone."""
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    rng = np.random.default_rng([cfg.seed, ["train", "val", "test"].index(split)])
    words = TRAIN_WORDS if split == "train" else 25
    lines, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        pool = POOLS["AB"[label]][:words]
        k = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        line = [SHARED[rng.integers(len(SHARED))] if rng.random() < cfg.noise else pool[rng.integers(len(pool))]
                for _ in range(k)]
        lines.append(" ".join(line))
        labels.append(label)
    return lines, labels


def fit_vocab(lines: list[str]) -> list[str]:
    return [PAD, UNK, *sorted({w for line in lines for w in line.lower().split()})]


class TokenData:
    def __init__(self, cfg: TokensConfig):
        self.cfg, self.splits = cfg, ["train", "val", "test"]
        text = {s: sentences(cfg, s) for s in self.splits}
        vocab = fit_vocab(text["train"][0])  # fitted on the train split only
        self.spec = TokenSpec(vocab_size=len(vocab))
        self.spec.assets["vocab.json"] = json.dumps(vocab).encode()
        v = self.spec.vocab()
        self.ids = {s: [self.spec.ids(line, v) for line in text[s][0]] for s in self.splits}
        self.y = {s: torch.tensor(text[s][1]) for s in self.splits}

    def loader(self, split, batch_size, *, train=False, seed=0, rank=0, world=1, device="cpu"):
        seqs, y = self.ids[split], self.y[split]

        def make(idx, epoch, gen):
            idx = idx.cpu()
            ids, mask = pad([seqs[i] for i in idx.tolist()], 0)  # padded to this batch's longest sequence
            return Batch(ids=ids, mask=mask, y=y[idx]).to(device)

        lengths = torch.tensor([len(s) for s in seqs])
        return Loader(len(seqs), batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device, lengths=lengths, bucket=self.cfg.bucket if train else 0)


if "plug_tokens" not in datasets:
    datasets.register("plug_tokens", config=TokensConfig)(TokenData)


@dataclass
class BagConfig:
    name: str = "plug_bag"
    dim: int = 16


class Bag(nn.Module):
    """Embedding -> mean over the real (unmasked) tokens -> linear."""

    def __init__(self, vocab_size: int, dim: int, classes: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab_size, dim), nn.Linear(dim, classes)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).float()
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled)


if "plug_bag" not in models:
    models.register("plug_bag", config=BagConfig, example=TokenSpec(vocab_size=30))(
        lambda cfg, spec: Bag(spec.vocab_size, cfg.dim, len(spec.classes)))


@dataclass
class TextClsConfig:
    name: str = "plug_textcls"


class TextCls(TaskBase):
    monitor = "acc"

    def __init__(self, cfg, spec):
        self.spec = spec

    def step(self, model, batch):
        logits = model(batch["ids"], batch["mask"]).float()
        return {"loss": F.cross_entropy(logits, batch["y"]), "acc": (logits.argmax(1) == batch["y"]).float().mean()}

    def eval_stats(self, model, batch, final=True):
        logits = model(batch["ids"], batch["mask"]).float()
        return {"loss_sum": F.cross_entropy(logits, batch["y"], reduction="sum").double(),
                "correct": (logits.argmax(1) == batch["y"]).sum(), "n": torch.tensor(len(batch))}

    def metrics(self, stats):
        n = max(int(stats["n"]), 1)
        return {"loss": stats["loss_sum"].item() / n, "acc": stats["correct"].item() / n}

    def report(self, folder, summary, model, data):
        return ["", "## Tokens", "", f"vocabulary: {self.spec.vocab_size} entries (train split)"]

    @torch.no_grad()
    def predict(self, model, inputs, top=1):
        batch, errors = self.spec.encode(inputs)
        rows = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            p = model.eval()(batch["ids"], batch["mask"]).float().softmax(-1)
            prob, idx = p.max(1)
            for row, q, i in zip([r for r in rows if "error" not in r], prob.tolist(), idx.tolist(), strict=True):
                row |= {"label": self.spec.classes[i], "prob": q}
        return rows


if "plug_textcls" not in tasks:
    tasks.register("plug_textcls", config=TextClsConfig)(lambda cfg, spec: TextCls(cfg, spec))
'''

RECIPE = {
    "name": "tokens",
    "data": {"name": "plug_tokens"},
    "model": {"name": "plug_bag"},
    "task": {"name": "plug_textcls"},
    "optim": {"name": "adamw", "lr": 0.02},
    "train": {"epochs": 6, "batch_size": 16, "log_every": 5, "precision": "fp32", "threads": 1,
              "tensorboard": False},
}
LONG = {**RECIPE, "train": {**RECIPE["train"], "epochs": 16, "checkpoint_every": 5}}  # 25 steps per epoch


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin module's folder, importable here (sys.path) and in subprocesses (PYTHONPATH)."""
    yield from plug(tmp_path_factory, "plug_tokens", PLUGIN)


def padding(batches) -> float:
    """Padded cells per real token over an epoch."""
    cells = real = 0
    for b in batches:
        cells, real = cells + b["mask"].numel(), real + int(b["mask"].sum())
    return cells / real


def test_loader_pads_each_batch_to_its_longest_sequence(plugin: Path) -> None:
    import plug_tokens

    data = plug_tokens.TokenData(plug_tokens.TokensConfig())
    lengths = torch.tensor([len(s) for s in data.ids["train"]])
    assert lengths.min() < lengths.max()  # really variable-length
    loader = data.loader("train", 16, train=True, seed=3)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 400 // 16
    seen = torch.cat([b["y"] for b in batches])
    assert len(seen) == 400
    for b in batches:
        ids, mask = b["ids"], b["mask"]
        assert ids.shape == mask.shape and mask.dtype == torch.bool
        n = mask.sum(1)
        assert ids.shape[1] == n.max()  # per batch, not per split
        assert (ids[~mask] == 0).all() and (ids[mask] > 0).all()  # pad id 0 only where the mask is off
    # bucketing by length pads little: ~17% here against ~60% for batches of random lengths 3..14
    flat = plug_tokens.TokenData(plug_tokens.TokensConfig(bucket=0)).loader("train", 16, train=True, seed=3)
    assert padding(loader.epoch(0)) < 1.25 < 1.4 < padding(flat.epoch(0))
    # the order is a function of (seed, epoch): the same again, another one for another epoch
    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(batches, loader.epoch(0), strict=True))
    assert not all(torch.equal(a["y"], b["y"]) for a, b in zip(batches, loader.epoch(1), strict=True))


def test_text_family_trains_evaluates_and_predicts(plugin: Path, tmp_path: Path) -> None:
    import plug_tokens

    t0 = time.perf_counter()
    run = nnlab.train(RECIPE, out=tmp_path, quiet=True, progress=False)
    train_s = time.perf_counter() - t0
    for name in (R.CONFIG, R.METRICS, R.SUMMARY, R.REPORT):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / R.CONFIG).read_text())["data"]["name"] == "plug_tokens"
    summary = run.summary
    assert summary["status"] == "completed" and summary["steps"] == 6 * (400 // 16)
    assert summary["best"]["metric"] == "val/acc" and summary["best"]["higher_is_better"] is True
    assert set(run.final) == {"test/loss", "test/acc"}
    assert run.final["test/acc"] > 0.9, run.final  # the pools are learnable
    assert any("train/loss" in r for r in run.metrics) and any("val/acc" in r for r in run.metrics)

    # the vocabulary asset: exactly the train split's words (val/test words never seen in train are not in it)
    cfg = plug_tokens.TokensConfig()
    train_words = {w for line in plug_tokens.sentences(cfg, "train")[0] for w in line.split()}
    test_words = {w for line in plug_tokens.sentences(cfg, "test")[0] for w in line.split()}
    assert test_words - train_words  # the test split has words the vocabulary must not know
    for which in ("best", "last"):
        vocab = json.loads((run / R.CHECKPOINTS / which / R.ASSETS / "vocab.json").read_text())
        assert vocab[:2] == ["<pad>", "<unk>"] and set(vocab[2:]) == train_words and len(vocab) == len(set(vocab))
    loaded = nnlab.load_model(run.path)
    assert json.loads(loaded.spec.assets["vocab.json"]) == vocab and loaded.spec.vocab_size == len(vocab)

    # `nnlab eval` (the real CLI, checkpoint best, split test) reproduces the summary's final metrics
    res = cli(plugin, "eval", str(run.path), "--json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)["metrics"]
    assert set(metrics) == {"loss", "acc"}
    for k, v in metrics.items():
        assert run.final[f"test/{k}"] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # `nnlab predict` on raw text: lines of a file, --text, unknown words, an empty text (an error row, exit 2)
    lines = tmp_path / "lines.txt"
    lines.write_text("apple1 apple2 the apple3 apple7\n\nBRICK4 brick5 of brick9\napple22 apple24 and\n")
    texts = ["xyzzy plugh", "quux frob nitz zork wibble", "brick1 of the brick2 brick3"]
    res = cli(plugin, "predict", str(run.path), str(lines), *[a for t in texts for a in ("--text", t)], "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    by_input = {r["input"]: r for r in rows}
    assert [r["input"] for r in rows] == texts + ["apple1 apple2 the apple3 apple7", "BRICK4 brick5 of brick9",
                                                  "apple22 apple24 and"]  # --text first, blank lines dropped
    assert all(r["label"] in ("A", "B") and 0.5 <= r["prob"] <= 1 for r in rows)
    assert by_input["apple1 apple2 the apple3 apple7"]["label"] == "A"
    assert by_input["BRICK4 brick5 of brick9"]["label"] == "B"  # lower-cased by the spec
    assert by_input["brick1 of the brick2 brick3"]["label"] == "B"
    assert by_input["apple1 apple2 the apple3 apple7"]["prob"] > 0.9
    # all-unknown lines are all unk ids: mean-pooled, any length gives the same output
    a, b = by_input["xyzzy plugh"], by_input["quux frob nitz zork wibble"]
    assert a["label"] == b["label"] and a["prob"] == pytest.approx(b["prob"], abs=1e-6)
    # words seen only in the test split are unknown too: "apple22 apple24 and" is unk unk "and"
    direct = run.predict([], texts=("apple22 apple24 and", "zz yy and"))
    assert direct[0]["prob"] == pytest.approx(direct[1]["prob"], abs=1e-6)

    res = cli(plugin, "predict", str(run.path), "--text", "apple1 apple2", "--text", "   ", "--json")
    assert res.returncode == 2 and "1 of 2 inputs could not be read" in res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows[0]["label"] == "A" and "empty text" in rows[1]["error"]

    # the report holds the run's figures and the task's own section
    report = (run / R.REPORT).read_text()
    assert "test/acc" in report and "## Tokens" in report and f"vocabulary: {len(vocab)} entries" in report
    (run / R.REPORT).unlink()
    res = cli(plugin, "report", str(run.path))
    assert res.returncode == 0, res.stderr
    assert "## Tokens" in (run / R.REPORT).read_text()
    assert train_s < 60


def test_sigkill_then_resume_matches_uninterrupted(plugin: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "tokens.yaml"
    recipe.write_text(yaml.safe_dump(LONG))
    ref_dir = run_dir(cli(plugin, "train", str(recipe), "--out", str(tmp_path / "ref"), "-q"))
    total = 16 * (400 // 16)
    folder = kill_midway(plugin, recipe, tmp_path / "k", (10, total // 2))
    resume(plugin, folder)
    a = json.loads((ref_dir / R.SUMMARY).read_text())
    b = json.loads((folder / R.SUMMARY).read_text())
    assert a["steps"] == b["steps"] == total
    assert a["final"] == b["final"] and a["best"] == b["best"]
    assert comparable(ref_dir) == comparable(folder)
    for which in ("best", "last"):  # the asset survives the kill and the resume
        assert ((folder / R.CHECKPOINTS / which / R.ASSETS / "vocab.json").read_bytes()
                == (ref_dir / R.CHECKPOINTS / which / R.ASSETS / "vocab.json").read_bytes())
