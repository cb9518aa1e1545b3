"""Using a trained run: rebuild its model and task from a checkpoint alone, start a model from another run's
weights (`init.from`), and `Run`, a run folder read, whose verbs go to the run's loop.

    run = nnlab.load_run("runs/mnist-cnn-..."); run.final; run.evaluate("test"); run.predict(["digit.png"])
    nnlab.load_model("runs/mnist-cnn-.../checkpoints/best").model
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import run as R
from .errors import UserError
from .registry import loops


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
