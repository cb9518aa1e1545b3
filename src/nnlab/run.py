"""THE run format: one folder per run, read by every command.

    <run>/config.yaml         the fully resolved config
    <run>/metrics.jsonl       one JSON object per log event: {"step", "epoch", "time", "train/loss", ...};
                              `time` is the run's seconds, summed over a resumed run's sittings
    <run>/summary.json        final and best metrics, wall time, parameter count, versions, device, seed
    <run>/checkpoints/last/   model.safetensors + model.json (config, data spec: rebuilds model and task)
                              + assets/ (what the run fitted: tokenizer, vocabulary, label map, statistics)
                              + trainer.pt (resume state: optimizers, RNG of every process, loop state)
    <run>/checkpoints/best/   the same, at the best value of the monitored metric
    <run>/init.json           with `init.from`: which tensors were loaded from the other run, new, skipped
    <run>/tb/                 TensorBoard event files
    <run>/plots/*.png         curves, confusion matrix, predictions grid
    <run>/report.md           a report embedding the plots

Every file is written to a temporary name and renamed into place, and a checkpoint folder is swapped
in whole, so a run killed at any moment leaves each file complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
PLOTS = "plots"
REPORT = "report.md"
WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
TRAIN_STATE = "trainer.pt"
ASSETS = "assets"
INIT = "init.json"
FORMAT = "nnlab-checkpoint"
FORMAT_VERSION = 2  # 2: the whole config, spec kinds and assets (1: the image-classification foundation)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename: the file is complete or absent."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); delete it or re-create the run") from None


def new_run_dir(out: str | Path, name: str) -> Path:
    """A fresh folder `<out>/<name>-<YYYYmmdd-HHMMSS>` (suffixed -2, -3, ... if taken)."""
    base = Path(out) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            i += 1
            path = base.with_name(f"{base.name}-{i}")


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def check_run(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run folder '{path}' does not exist")
    if not is_run(path):
        raise UserError(f"'{path}' is not an nnlab run folder (it has no {CONFIG}); "
                        f"pass a folder made by `nnlab train`, e.g. runs/<name>-<date>")
    return path


# --- checkpoints -------------------------------------------------------------------------------------

def swap_in(tmp: Path, final: Path) -> None:
    """Replace folder `final` by the complete folder `tmp`. If killed between the two renames, `final`
    is absent and `final.old` complete: `recover` puts it back."""
    old = final.with_name(final.name + ".old")
    recover(final)  # a kill between the renames last time: `old` is the only complete copy
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)


def checkpoint_meta(config: dict[str, Any], spec: Any, step: int, epoch: int, metrics: dict[str, float]
                    ) -> dict[str, Any]:
    """model.json: the whole resolved config and the data spec (its fields; assets go to files), so the model
    and task are rebuilt from the checkpoint alone."""
    import dataclasses

    import torch

    import nnlab

    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "assets"} if spec else {}
    return {"format": FORMAT, "version": FORMAT_VERSION, "config": config, "spec": fields, "step": step,
            "epoch": epoch, "metrics": metrics, "nnlab_version": nnlab.__version__, "torch_version": torch.__version__}


def save_checkpoint(folder: Path, model, meta: dict[str, Any], train_state: dict[str, Any] | None,
                    assets: dict[str, bytes] | None = None) -> None:
    """Write weights (safetensors), model.json, assets/ and optional resume state atomically."""
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    write_json(tmp / MODEL_META, meta)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    if assets:
        (tmp / ASSETS).mkdir()
        for name, data in assets.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"asset name '{name}' must be a plain file name")
            atomic_write(tmp / ASSETS / name, data)
    for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    swap_in(tmp, folder)


def read_meta(folder: Path) -> dict[str, Any]:
    recover(folder)
    if not (folder / MODEL_META).is_file():
        raise UserError(f"no checkpoint at {folder} (missing {MODEL_META}); pass a run folder or a checkpoint "
                        f"folder written by nnlab")
    meta = read_json(folder / MODEL_META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder / MODEL_META} is not an nnlab checkpoint (foreign or corrupt file)")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {folder} has format version {meta.get('version')}; this nnlab reads version "
                        f"{FORMAT_VERSION} only: retrain it, or read it with the nnlab that wrote it")
    return meta


def load_assets(folder: Path) -> dict[str, bytes]:
    d = Path(folder) / ASSETS
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()} if d.is_dir() else {}


def load_weights(folder: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint weights {folder / WEIGHTS} are corrupt ({e}); use another checkpoint "
                        f"(e.g. checkpoints/last) or retrain") from None


def load_train_state(folder: Path) -> dict[str, Any]:
    """Resume state, read with torch's restricted (weights-only) unpickler: no code runs from it."""
    import pickle

    import torch

    try:
        return torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no {TRAIN_STATE}, so it cannot be resumed") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"resume state {folder / TRAIN_STATE} is corrupt or unsafe ({str(e).splitlines()[0]})"
                        ) from None


def checkpoint_dir(path: str | Path, which: str = "best") -> Path:
    """A checkpoint folder from a run folder (its `which` checkpoint, falling back to last) or itself."""
    path = Path(path)
    if (path / MODEL_META).is_file() or (path.with_name(path.name + ".old") / MODEL_META).is_file():
        return path
    check_run(path)
    for name in (which, "last"):
        folder = path / CHECKPOINTS / name
        recover(folder)
        if folder.is_dir():
            return folder
    raise UserError(f"run '{path}' has no checkpoint yet (nothing in {path / CHECKPOINTS})")


# --- metrics -----------------------------------------------------------------------------------------

def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All events of `metrics.jsonl`; a torn last line (a kill mid-write) is ignored."""
    rows = []
    f = Path(path) / METRICS
    if not f.is_file():
        return rows
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, keep: int) -> int:
    """Keep the first `keep` events, those logged before the checkpoint a run resumes from, so the log
    matches an uninterrupted run's (final evaluations of a run killed while finishing included).
    Returns how many events the file now holds."""
    rows = read_metrics(path)[:keep]
    atomic_write(Path(path) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((Path(path) / CONFIG).read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{Path(path) / CONFIG} is corrupt ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{Path(path) / CONFIG} is not a config mapping")
    if "loop" not in cfg:  # the foundation's runs name no loop and keep optimizer fields in `train`
        raise UserError(f"run '{path}' was written in run format version 1; this nnlab reads version "
                        f"{FORMAT_VERSION} only: retrain it, or read it with the nnlab that wrote it")
    return cfg


def list_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if is_run(root):
        return [root]
    return sorted((p for p in root.glob("*") if is_run(p)), key=lambda p: p.stat().st_mtime)


def yaml_dump(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False)
