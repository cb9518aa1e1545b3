"""Using a trained run: rebuild its model from a checkpoint, evaluate it on a split, predict files.

A checkpoint rebuilds its model from its own `model.json` (family name, config, data spec) and
`model.safetensors`, with no trainer involved: `load_model("runs/mnist-cnn-.../checkpoints/best")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import run as R
from .errors import UserError


@dataclass
class Loaded:
    model: torch.nn.Module
    task: Any
    spec: Any
    meta: dict[str, Any]


def load_model(path: str | Path, which: str = "best", device: str = "cpu") -> Loaded:
    """Rebuild the model of a run folder (its `which` checkpoint) or of a checkpoint folder."""
    from .config import section_from_dict
    from .data import DataSpec
    from .models import build, models
    from .tasks import build as build_task
    from .tasks import tasks

    folder = R.checkpoint_dir(path, which)
    meta = R.read_meta(folder)
    try:
        spec = DataSpec(**{**meta["spec"], "input_shape": tuple(meta["spec"]["input_shape"])})
        model_cfg = section_from_dict(models, meta["model"])
        task = build_task(section_from_dict(tasks, meta["task"]), spec)
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder / R.MODEL_META} is incomplete or foreign ({e})") from None
    model = build(model_cfg.name, model_cfg, spec)
    try:
        model.load_state_dict(R.load_weights(folder))
    except RuntimeError as e:
        raise UserError(f"weights in {folder} do not fit the model described in its {R.MODEL_META} "
                        f"({str(e).splitlines()[0]})") from None
    return Loaded(model.to(device).eval(), task, spec, meta)


def read_image(path: str | Path, spec: Any) -> torch.Tensor:
    """An image file as uint8 (C, H, W) in the model's input size and channel count."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    c, h, w = spec.input_shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if c == 1 else t.permute(2, 0, 1).contiguous()


def predict_files(path: str | Path, files: list[str | Path], which: str = "best", top: int = 1
                  ) -> list[dict[str, Any]]:
    """Class and probability for each image file. A file that cannot be read gets an `error` entry;
    the others are still predicted."""
    from .data import normalize

    if top < 1:
        raise UserError(f"--top must be at least 1 (got {top})")
    loaded = load_model(path, which)
    results: list[dict[str, Any]] = []
    images, slots = [], []
    for f in files:
        try:
            images.append(read_image(f, loaded.spec))
            slots.append(len(results))
            results.append({"file": str(f)})
        except UserError as e:
            results.append({"file": str(f), "error": str(e)})
    if images:
        x = normalize(torch.stack(images), loaded.spec)
        probs = loaded.task.predict(loaded.model, x)
        p, idx = probs.topk(min(top, probs.shape[1]), dim=1)
        for slot, pi, ii in zip(slots, p.tolist(), idx.tolist(), strict=True):
            results[slot] |= {"class": loaded.spec.classes[ii[0]], "prob": pi[0],
                              "top": [(loaded.spec.classes[i], q) for i, q in zip(ii, pi, strict=True)]}
    return results


def evaluate_run(path: str | Path, split: str = "test", which: str = "best", data_dir: str | None = None,
                 tta: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Metrics of a run's checkpoint on a split of its dataset (same preprocessing as in training)."""
    from . import dist
    from .config import load_config
    from .data import Loader, datasets, normalize
    from .evaluate import evaluate, resolve_precision

    path = R.check_run(path)
    overrides = [f"data.data_dir={data_dir}"] if data_dir else []
    cfg = load_config(R.read_config(path), overrides)
    env = dist.Env(dist.pick_device(device))
    loaded = load_model(path, which, device=str(env.device))
    if tta:
        loaded.task.cfg.tta = tta
    data = datasets[cfg.data.name].factory(cfg.data)
    if split not in data.splits:
        raise UserError(f"dataset '{cfg.data.name}' has no split '{split}'; it has: {', '.join(data.splits)}")
    x, y = data.splits[split]
    loader = Loader(x, y, cfg.train.eval_batch_size, device=env.device,
                    transform=lambda b: normalize(b, data.spec))
    metrics, stats = evaluate(loaded.model, loaded.task, loader, env,
                              resolve_precision(cfg.train.precision, env.device))
    out: dict[str, Any] = {"run": str(path), "split": split, "checkpoint": which, "metrics": metrics}
    if hasattr(loaded.task, "report") and "confusion" in stats:
        out["report"] = loaded.task.report(stats)
    return out


class Run:
    """A run folder, read: `config`, `summary`, `metrics`, and its model on demand."""

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
    def metrics(self) -> list[dict[str, Any]]:
        return R.read_metrics(self.path)

    def model(self, which: str = "best") -> torch.nn.Module:
        return load_model(self.path, which).model

    def evaluate(self, split: str = "test", which: str = "best") -> dict[str, Any]:
        return evaluate_run(self.path, split, which)

    def predict(self, files: list[str | Path], which: str = "best") -> list[dict[str, Any]]:
        return predict_files(self.path, files, which)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def load_run(path: str | Path) -> Run:
    return Run(path)
