"""Using a trained run: rebuild its model and task from a checkpoint alone, start a model from another run's
weights (`init.from`), `Run`, a run folder read, whose verbs go to the run's loop, and those verbs for
every task-based loop (`evaluate_run`, `predict_run`, `report_run`).

    run = nnlab.load_run("runs/mnist-cnn-..."); run.final; run.evaluate("test"); run.predict(["digit.png"])
    nnlab.load_model("runs/mnist-cnn-.../checkpoints/best").model
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import dist
from . import run as R
from .config import load_config
from .data import datasets
from .errors import UserError
from .evaluate import evaluate, resolve_precision
from .registry import loops
from .report import write_report


@dataclass
class Loaded:
    model: torch.nn.Module
    task: Any
    spec: Any  # with its assets (tokenizer, vocabulary, ...) read from the checkpoint's assets/
    meta: dict[str, Any]


def load_model(path: str | Path, which: str = "best", device: str = "cpu", task: Any = None) -> Loaded:
    """Rebuild the model, data spec (with assets) and task of a run folder's `which` checkpoint, or of a
    checkpoint folder, from model.json, assets/ and model.safetensors. `task`: a task config to use instead
    of the saved one (an evaluation with other options)."""
    from .config import section_from_dict
    from .data import specs
    from .models import build, models
    from .tasks import build as build_task
    from .tasks import tasks

    folder = R.checkpoint_dir(path, which)
    meta = R.read_meta(folder)
    try:
        fields = dict(meta["spec"])
        spec = specs[fields.get("kind", "?")].factory(**fields)
        spec.assets = R.load_assets(folder)
        model_cfg = section_from_dict(models, meta["config"]["model"])
        task = build_task(task or section_from_dict(tasks, meta["config"]["task"]), spec)
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder / R.MODEL_META} is incomplete or foreign ({e})") from None
    model = build(model_cfg.name, model_cfg, spec)
    try:
        model.load_state_dict(R.load_weights(folder))
    except RuntimeError as e:
        raise UserError(f"weights in {folder} do not fit the model described in its {R.MODEL_META} "
                        f"({str(e).splitlines()[0]})") from None
    return Loaded(model.to(device).eval(), task, spec, meta)


@torch.no_grad()
def init_from(model: torch.nn.Module, source: str | Path, which: str = "best") -> dict[str, Any]:
    """Copy into `model` every tensor of another run's checkpoint whose name and shape match. Returns the table:
    `loaded`, `new` (kept as initialised: absent there, or another shape, as a head for other classes, with the
    shapes), `skipped` (there but not in this model)."""
    try:
        folder = R.checkpoint_dir(source, which)
        R.read_meta(folder)
        theirs = R.load_weights(folder)
    except UserError as e:
        raise UserError(f"init.from={source}: {e}") from None
    mine = model.state_dict()
    loaded = [k for k, v in mine.items() if k in theirs and theirs[k].shape == v.shape]
    new = [k if k not in theirs else f"{k} {tuple(theirs[k].shape)}->{tuple(mine[k].shape)}"
           for k in mine if k not in loaded]
    if not loaded:
        raise UserError(f"init.from={source}: no tensor of {folder} fits this model (mismatching: "
                        f"{', '.join(new[:8])}); start from a run of the same model family")
    for k in loaded:
        mine[k].copy_(theirs[k])
    return {"source": str(folder), "loaded": loaded, "new": new, "skipped": [k for k in theirs if k not in mine]}


class Run:
    """A run folder, read: `config`, `summary`, `final`, `metrics`; its loop answers `evaluate`, `predict`,
    `report`."""

    def __init__(self, path: str | Path):
        self.path = R.check_run(path)

    @cached_property
    def config(self) -> dict[str, Any]:
        return R.read_config(self.path)

    @cached_property
    def summary(self) -> dict[str, Any]:
        f = self.path / R.SUMMARY
        return R.read_json(f) if f.exists() else {}

    @property
    def final(self) -> dict[str, float]:
        return self.summary.get("final", {})

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return R.read_metrics(self.path)

    @property
    def loop(self) -> Any:
        return loops[str(self.config["loop"])].factory

    def model(self, which: str = "best") -> torch.nn.Module:
        return load_model(self.path, which).model

    def evaluate(self, split: str = "test", which: str = "best", overrides: tuple[str, ...] = ()) -> dict[str, Any]:
        return self.loop.evaluate(self, split, which, tuple(overrides))

    def predict(self, inputs: list[str], which: str = "best", top: int = 1, texts: tuple[str, ...] = ()
                ) -> list[dict[str, Any]]:
        return self.loop.predict(self, [str(i) for i in inputs], which, top, tuple(texts))

    def report(self, overrides: tuple[str, ...] = ()) -> Path:
        return self.loop.report(self, overrides=tuple(overrides))

    def __truediv__(self, name: str) -> Path:  # run / "summary.json": a path in the folder
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def load_run(path: str | Path) -> Run:
    return Run(path)


# --- the verbs of a task-based loop (the supervised loop's evaluate, predict and report) -----------------
def evaluate_run(run: Run, split: str = "test", which: str = "best", overrides: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """Metrics of a run's checkpoint on a split of its dataset; `overrides` change the run's config for this
    evaluation (e.g. `data.data_dir=...`, `task.tta=flip`, `train.eval_batch_size=500`)."""
    cfg = load_config(run.config, overrides)
    env = dist.Env(dist.pick_device(cfg.train.device))
    loaded = load_model(run.path, which, str(env.device), task=cfg.task)
    data = datasets[cfg.data.name].factory(cfg.data)
    if split not in data.splits:
        raise UserError(f"dataset '{cfg.data.name}' has no split '{split}'; it has: {', '.join(data.splits)}")
    loader = data.loader(split, cfg.train.eval_batch_size, device=env.device)
    precision = resolve_precision(cfg.train.precision, env.device)
    metrics, stats = evaluate(loaded.model, loaded.task, loader, env, precision)
    return {"run": str(run.path), "split": split, "checkpoint": which, "metrics": metrics,
            "details": loaded.task.describe(stats)}

def predict_run(run: Run | Path, inputs: list[str], which: str = "best", top: int = 1,
                texts: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The task's output for each raw input: files (images), or for text data the lines of each file
    (`-`: standard input) and `texts`."""
    if top < 1:
        raise UserError(f"--top must be at least 1 (got {top})")
    loaded = load_model(run.path if isinstance(run, Run) else run, which)
    items = list(inputs)
    if loaded.spec.inputs == "text":
        items = list(texts) + [line for f in inputs for line in _lines(f)]
    elif texts:
        raise UserError("this run's model reads files, not --text; pass file paths")
    if not items:
        raise UserError("nothing to predict: pass inputs (or --text)")
    rows = loaded.task.predict(loaded.model, items, top)
    return [{"input": i, **row} for i, row in zip(items, rows, strict=True)]

def report_run(run: Run, model: torch.nn.Module | None = None, task: Any = None, data: Any = None,
               overrides: tuple[str, ...] = ()) -> Path:
    """(Re)render report.md and the plots; without the model and data given, they are loaded when they can be."""
    notes: list[str] = []
    if task is None:
        try:
            loaded = load_model(run.path)
            model, task = loaded.model, loaded.task
            cfg = load_config(run.config, overrides)
            data = datasets[cfg.data.name].factory(cfg.data)
        except UserError as e:
            notes = ["", f"(Sections that need the model or the data are missing: {e})"]
            model = data = None
    sections = task.report(run.path, run.summary, model, data) if task is not None else []
    return write_report(run.path, notes + sections, ["loss", task.monitor if task is not None else "acc"])


def _lines(f: str) -> list[str]:
    try:
        data = sys.stdin.buffer.read() if f == "-" else Path(f).read_bytes()
        return [line for line in data.decode("utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{f}: no such file (to predict a text itself, use --text)") from None
    except UnicodeDecodeError as e:  # an image, or text in another encoding: 0x0a is a newline
        raise UserError(f"{f}:{data.count(0x0A, 0, e.start) + 1}: not UTF-8 text (byte {data[e.start]:#04x}); this "
                        f"run's model reads UTF-8 text files, one text per line, or --text") from None
    except OSError as e:
        raise UserError(f"{f}: not a readable text file ({e.__class__.__name__})") from None
