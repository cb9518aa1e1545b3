"""A run in progress, for every loop: the folder, tracking, the clock, checkpoints with the RNG of every process,
resume, the evaluation callback and summary.json. `train()` and `resume()` pick the config's loop and run it.

    run = nnlab.train("mnist-cnn", train={"epochs": 3}); run.final["test/acc"]

A loop is a registered class (`nnlab.loops.register("name")`) with `sections` (config section -> registry
or dataclass), `defaults` (section -> default entry name) and the verbs `train(cfg, session) -> final
metrics`, `evaluate`, `predict` and `report` (see supervised.py's `Supervised`). Its `train` section's dataclass
extends `LoopConfig`, whose fields the session reads.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import dist
from . import run as R
from .config import Config, load_config
from .errors import UserError
from .registry import loops
from .track import Progress, Tracker


@dataclass
class LoopConfig:
    """The fields every loop's `train` section has (its dataclass extends this one)."""

    seed: int = 0  # seeds initialisation, data order, augmentation, dropout, exploration
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch (0: torch's default)
    deterministic: bool = False  # deterministic algorithms (slower on GPU; CPU runs are repeatable anyway)
    tensorboard: bool = True  # also write TensorBoard event files


OnEval = Callable[[int, dict[str, float]], Any]  # (step, metrics) -> True to stop the run


class Session:
    """What a loop needs from the run format. Rank 0 writes; every process calls the same methods."""

    def __init__(self, cfg: Config, env: dist.Env, out: str | Path = "runs", resume: Path | None = None,
                 quiet: bool = False, progress: bool = True, on_eval: OnEval | None = None):
        self.cfg, self.env, self.on_eval, self.resumed = cfg, env, on_eval, resume is not None
        self.progress = Progress(progress and env.main, quiet)
        if resume is not None:
            self.folder = Path(resume)
            if env.main:  # a kill in the middle of a checkpoint swap: put the complete copy back
                for name in ("last", "best"):
                    R.recover(self.folder / R.CHECKPOINTS / name)
            dist.barrier(env)
        else:
            self.folder = Path(dist.broadcast_object(str(R.new_run_dir(out, cfg.name)) if env.main else None, env))
            if env.main:
                R.atomic_write(self.folder / R.CONFIG, cfg.to_yaml())
        self.tracker: Tracker | None = None

    def track(self, step: int = 0, rows: int = 0, elapsed: float = 0.0) -> Tracker:
        """Open metrics.jsonl (keeping its first `rows` events, those of the checkpoint resumed from) and TB."""
        if self.env.main and self.resumed:
            rows = R.truncate_metrics(self.folder, rows)
        self.tracker = Tracker(self.folder if self.env.main else None, self.cfg.train.tensorboard,
                               purge_step=step + 1, rows=rows, elapsed=elapsed)
        return self.tracker

    def save(self, name: str, model: torch.nn.Module, state: dict[str, Any], spec: Any = None,
             metrics: dict[str, float] | None = None, step: int = 0, epoch: int = 0) -> None:
        """Checkpoint `name`: the weights of `model`, model.json, the spec's assets, and `state` (optimizer
        states, loop state) plus every process's RNG and the tracker's rows and clock, for an exact resume."""
        rng = [torch.get_rng_state()]
        if self.env.device.type == "cuda":
            rng.append(torch.cuda.get_rng_state(self.env.device))
        rng = dist.gather_objects(rng, self.env)
        if not self.env.main:
            return
        t = self.tracker
        state = {**state, "rng": rng, "rows": t.rows if t else 0, "wall_time": t.elapsed() if t else 0.0}
        meta = R.checkpoint_meta(self.cfg.to_dict(), spec, step, epoch, metrics or {})
        R.save_checkpoint(self.folder / R.CHECKPOINTS / name, model, meta, state, getattr(spec, "assets", None))

    def load(self, name: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights, state) of checkpoint `name`; this process's RNG is restored from it."""
        folder = R.checkpoint_dir(self.folder, name)
        state, weights = R.load_train_state(folder), R.load_weights(folder)
        try:
            rng = state["rng"][self.env.rank % len(state["rng"])]
            torch.set_rng_state(rng[0])
            if self.env.device.type == "cuda" and len(rng) > 1:
                torch.cuda.set_rng_state(rng[1], self.env.device)
        except (KeyError, IndexError, TypeError, RuntimeError) as e:
            raise UserError(f"resume state in {folder} is not this nnlab's ({e})") from None
        return weights, state

    def evaluated(self, step: int, metrics: dict[str, float]) -> bool:
        """Call the evaluation callback; True when it asks to stop the run (rank 0's answer, on every process)."""
        if self.on_eval is None:
            return False
        return bool(dist.broadcast_object(bool(self.on_eval(step, dict(metrics))), self.env))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: the loop's figures plus what every run records."""
        import nnlab

        if self.env.main:
            R.write_json(self.folder / R.SUMMARY, {
                "name": self.cfg.name, "loop": self.cfg.loop, **summary,
                "wall_time_s": round(self.tracker.elapsed(), 3) if self.tracker else None,
                "device": str(self.env.device), "world_size": self.env.world, "seed": self.cfg.train.seed,
                "nnlab_version": nnlab.__version__, "torch_version": torch.__version__})

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def setup(t: LoopConfig) -> dist.Env:
    env = dist.setup(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return env


def fit(cfg: Config, out: str | Path = "runs", resume_dir: Path | None = None, quiet: bool = False,
        progress: bool = True, on_eval: OnEval | None = None) -> Any:
    """Run `cfg` with its loop; returns the `Run` (its folder, summary and final metrics)."""
    from .infer import Run

    loop = loops[cfg.loop].factory
    env = setup(cfg.train)
    try:
        session = Session(cfg, env, out, resume_dir, quiet, progress, on_eval)
        try:
            loop.train(cfg, session)
        except BaseException:
            if env.main and not session.resumed and session.tracker is None:  # refused before it began: no folder
                shutil.rmtree(session.folder, ignore_errors=True)
            raise
        finally:
            session.close()
        dist.barrier(env)  # every process done (rank 0 writes the report) before the group goes away
        return Run(session.folder)
    finally:
        dist.cleanup(env)


def train(recipe: str | Path | dict = "digits-cnn", overrides: tuple[str, ...] | list[str] = (), *,
          out: str | Path = "runs", quiet: bool = False, progress: bool = True, on_eval: OnEval | None = None,
          **sections: dict[str, Any]) -> Any:
    """Train a recipe (name, YAML path or dict) with dotted overrides and/or keyword sections, e.g.
    `train("mnist-cnn", train={"epochs": 3})`. `on_eval(step, metrics)` is called after every evaluation
    and stops the run when it returns True (pruning in a search). Returns the `Run`."""
    return fit(load_config(recipe, tuple(overrides), **sections), out, None, quiet, progress, on_eval)


def resume(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = (), *, quiet: bool = False,
           progress: bool = True, on_eval: OnEval | None = None) -> Any:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run."""
    run_dir = R.check_run(run_dir)
    cfg = load_config(R.read_config(run_dir), tuple(overrides))
    return fit(cfg, resume_dir=run_dir, quiet=quiet, progress=progress, on_eval=on_eval)


