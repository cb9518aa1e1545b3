"""THE training loop for supervised and self-supervised tasks: one explicit loop, readable in one sitting.

    nnlab.train("mnist-cnn", train={"epochs": 3})  ->  Path of the run folder

The task owns the objective (`task.step`), the model is any registered family, the data is sliced from
in-memory tensors. The loop handles precision, accumulation, clipping, schedules, EMA, evaluation, best
and last checkpoints, early stopping, exact resume and torchrun (DistributedDataParallel).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import dist
from . import run as R
from .config import Config, check, load_config
from .data import Augment, Loader, datasets, normalize
from .errors import Diverged, UserError
from .evaluate import autocast, evaluate, resolve_precision
from .models import build as build_model
from .optim import EMA, build_optimizer, set_lr
from .tasks import build as build_task
from .track import Progress, Tracker

NEVER = 2**62  # `first_bad` while every loss so far was finite


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training split
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    batch_size: int = 128  # examples per optimizer step, over all processes together
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    optimizer: str = "adamw"  # sgd | adamw | muon (Muon on hidden weight matrices, Nesterov SGD on the rest)
    lr: float = 1e-3  # peak learning rate (of SGD/AdamW)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum for SGD
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 0.0  # decoupled (AdamW) or L2 (SGD) weight decay on >=2-D weights (none on Muon's)
    decouple_wd: bool = False  # weight_decay is the fraction of a weight removed per step at peak lr, for every
    #                            group alike (divided by each group's lr; airbench's SGD); default: times the lr
    decay_biases: bool = False  # weight decay on biases and norm parameters too
    muon_lr: float = 0.02  # learning rate of Muon's parameter group
    muon_momentum: float = 0.95  # Muon momentum (Nesterov)
    muon_ns_steps: int = 5  # Newton-Schulz iterations orthogonalising each Muon update
    muon_normalize: bool = False  # rescale each Muon weight to Frobenius norm sqrt(rows) before its step
    head_lr: float = 0.0  # learning rate of the head (the model's last weight matrix); 0: same as lr
    schedule: str = "cosine"  # learning-rate schedule: constant | cosine | linear | onecycle
    warmup: float = 0.0  # fraction of all steps spent in linear warm-up (the peak for onecycle)
    min_lr: float = 0.0  # final learning rate as a fraction of the peak
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware has it, else fp32)
    compile: bool = False  # torch.compile the model; falls back to eager if compilation fails
    channels_last: bool = False  # channels-last memory format for conv nets
    ema: float = 0.0  # decay of an exponential moving average of weights, evaluated and saved (0: off)
    freeze_bias_after: int = 0  # '*.whiten.bias' lr decays linearly to 0 over this many epochs, then stays (0: off)
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # evaluated during training (if present)
    eval_every: int = 1  # epochs between evaluations (0: none during training)
    eval_every_steps: int = 0  # also evaluate every this many steps (0: off)
    eval_batch_size: int = 1000  # batch size for evaluation
    final_splits: list[str] = field(default_factory=lambda: ["test"])  # evaluated with the best weights at the end
    monitor: str = "val/acc"  # metric choosing the best checkpoint and early stopping ('' : last is best)
    early_stopping: int = 0  # stop after this many evaluations without improvement (0: off)
    checkpoint_every: int = 0  # steps between extra checkpoints (0: at epoch ends and evaluations only)
    log_every: int = 50  # steps between train/* log events
    seed: int = 0  # seeds initialisation, data order, augmentation and dropout
    deterministic: bool = False  # deterministic algorithms (slower on GPU; CPU runs are repeatable anyway)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch (0: torch's default)
    tensorboard: bool = True  # also write TensorBoard event files

    def __post_init__(self) -> None:
        for key in ("epochs", "max_steps", "weight_decay", "grad_clip", "ema", "eval_every", "early_stopping",
                    "checkpoint_every", "threads", "freeze_bias_after", "eval_every_steps"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        for key in ("batch_size", "accumulate", "log_every", "eval_batch_size"):
            check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be a positive number")
        check(self.epochs > 0 or self.max_steps > 0, "train.epochs", "set train.epochs or train.max_steps > 0")
        check(self.batch_size % self.accumulate == 0, "train.accumulate", "must divide train.batch_size")
        check(self.optimizer in ("sgd", "adamw", "muon"), "train.optimizer", "must be sgd, adamw or muon")
        check(self.schedule in ("constant", "cosine", "linear", "onecycle"), "train.schedule",
              "must be constant, cosine, linear or onecycle")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", "must be auto, fp32, bf16 or fp16")
        check(0 <= self.warmup < 1 and 0 <= self.min_lr <= 1, "train.warmup", "warmup and min_lr must be in [0, 1)")
        check(self.ema < 1, "train.ema", "must be in [0, 1)")
        check(len(self.betas) == 2, "train.betas", "must be two numbers, e.g. [0.9, 0.999]")


def train(recipe: str | Path | dict = "digits-cnn", overrides: tuple[str, ...] = (), *, out: str | Path = "runs",
          quiet: bool = False, progress: bool = True, **sections: dict[str, Any]) -> Path:
    """Train a recipe (name, YAML path or dict) with dotted overrides and/or keyword sections, e.g.
    `train("mnist-cnn", train={"epochs": 3})`. Returns the run folder."""
    return fit(load_config(recipe, overrides, **sections), out=out, quiet=quiet, progress=progress)


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), *, quiet: bool = False,
           progress: bool = True) -> Path:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run."""
    run_dir = R.check_run(run_dir)
    cfg = load_config(R.read_config(run_dir), overrides)
    return fit(cfg, resume_dir=run_dir, quiet=quiet, progress=progress)


def fit(cfg: Config, out: str | Path = "runs", resume_dir: Path | None = None, quiet: bool = False,
        progress: bool = True) -> Path:
    env = dist.setup(cfg.train.device)
    try:
        folder = Trainer(cfg, env, quiet, progress).run(out, resume_dir)
        dist.barrier(env)  # every process done (rank 0 writes the report) before the group goes away
        return folder
    finally:
        dist.cleanup(env)


class Trainer:
    def __init__(self, cfg: Config, env: dist.Env, quiet: bool, progress: bool):
        t = cfg.train
        self.cfg, self.t, self.env = cfg, t, env
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.precision = resolve_precision(t.precision, env.device)
        self.progress = Progress(progress and env.main, quiet)

        self.data = datasets[cfg.data.name].factory(cfg.data)
        self.spec = self.data.spec
        if t.batch_size % (env.world * t.accumulate):
            raise UserError(f"train.batch_size={t.batch_size} must be divisible by the {env.world} process(es) "
                            f"x train.accumulate={t.accumulate}")
        torch.manual_seed(t.seed)  # the same initial weights on every process
        self.model = build_model(cfg.model.name, cfg.model, self.spec).to(env.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = build_task(cfg.task, self.spec)
        self.prepare = partial(normalize, spec=self.spec, channels_last=t.channels_last)
        x, y = self.split("train")
        aug = Augment(getattr(cfg.data, "crop_padding", 0), getattr(cfg.data, "flip", "none"), t.seed,
                      getattr(cfg.data, "padding_mode", "zeros"))
        self.loader = Loader(x, y, t.batch_size, shuffle=True, drop_last=True, seed=t.seed, augment=aug,
                             rank=env.rank, world=env.world, device=env.device, transform=self.prepare)
        if len(self.loader) == 0:
            raise UserError(f"train.batch_size={t.batch_size} is larger than the training split ({len(x)} examples)")
        self.steps_per_epoch = len(self.loader)
        self.total = t.max_steps or t.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total / self.steps_per_epoch)
        if hasattr(self.task, "optimizer"):  # a task with its own optimizers (a GAN: one per player)
            self.opt = self.task.optimizer(self.model, t)
            for g in self.opt.param_groups:
                g.setdefault("base_lr", g["lr"])  # what the schedule scales
        else:
            self.opt = build_optimizer(self.model, t)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16" and env.device.type == "cuda")
        self.ema = EMA(self.model, t.ema) if t.ema else None
        # rows: metrics.jsonl events when last saved; wall_time: the run's seconds then, over all sittings
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None,
                                      "bad_evals": 0, "stopped": False, "validated": -1, "train_time": 0.0,
                                      "wall_time": 0.0, "samples": 0, "rows": 0}
        self.first_bad = torch.tensor(NEVER, device=env.device)  # first step with a non-finite loss
        self.last_val: dict[str, float] = {}  # latest evaluation, shown at epoch ends
        self.evals: dict[tuple[str, bool], tuple[dict, dict]] = {}  # (split, final) -> (metrics, stats) at evals_step
        self.evals_step = -1

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.data.splits:
            raise UserError(f"dataset '{self.cfg.data.name}' has no '{name}' split "
                            f"(it has: {', '.join(self.data.splits)})")
        return self.data.splits[name]

    def eval_loader(self, name: str) -> Loader:
        x, y = self.split(name)
        return Loader(x, y, self.t.eval_batch_size, rank=self.env.rank, world=self.env.world,
                      device=self.env.device, transform=self.prepare)

    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema else self.model

    # --- checkpoints ---------------------------------------------------------------------------------
    def meta(self, metrics: dict[str, float]) -> dict[str, Any]:
        import nnlab

        return {"model": dataclasses.asdict(self.cfg.model), "spec": dataclasses.asdict(self.spec),
                "task": dataclasses.asdict(self.cfg.task), "step": self.state["step"],
                "epoch": self.state["epoch"], "metrics": metrics, "nnlab_version": nnlab.__version__,
                "torch_version": torch.__version__}

    def sync_buffers(self) -> None:
        for m in (self.model, self.ema.model) if self.ema else (self.model,):
            dist.broadcast_buffers(m, self.env)

    def save(self, name: str, metrics: dict[str, float] | None = None) -> None:
        self.sync_buffers()
        rng = [torch.get_rng_state()]  # the dropout RNG of every process
        if self.env.device.type == "cuda":
            rng.append(torch.cuda.get_rng_state(self.env.device))
        rng = dist.gather_objects(rng, self.env)
        if not self.env.main:
            return
        self.state["rows"], self.state["wall_time"] = self.tracker.rows, self.tracker.elapsed()
        resume_state = {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                        "rng": rng, "state": dict(self.state)}
        if self.ema:
            resume_state["raw_model"] = self.model.state_dict()  # the file's weights are the EMA ones
        R.save_checkpoint(self.folder / R.CHECKPOINTS / name, self.eval_model(), self.meta(metrics or {}),
                          resume_state)

    def load(self, folder: Path) -> None:
        st = R.load_train_state(folder)
        weights = R.load_weights(folder)
        try:
            self.eval_model().load_state_dict(weights)
            if self.ema:
                self.model.load_state_dict(st["raw_model"])
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
            self.opt.load_state_dict(st["optimizer"])
            for g, hyper in zip(self.opt.param_groups, fresh, strict=True):
                g.update(hyper)  # learning rates, decay, momentum from the config: overrides win
            self.scaler.load_state_dict(st["scaler"])
            rng = st["rng"][self.env.rank % len(st["rng"])]
            torch.set_rng_state(rng[0])
            if self.env.device.type == "cuda" and len(rng) > 1:
                torch.cuda.set_rng_state(rng[1], self.env.device)
            self.state = self.state | st["state"]
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"checkpoint {folder} does not match this run's model/optimizer "
                            f"({str(e).splitlines()[0]})") from None

    # --- the loop ------------------------------------------------------------------------------------
    def run(self, out: str | Path, resume_dir: Path | None) -> Path:
        t, env, state = self.t, self.env, self.state
        if resume_dir is not None:
            self.folder = Path(resume_dir)
            if env.main:  # a kill in the middle of a checkpoint swap: put the complete copy back
                for name in ("last", "best"):
                    R.recover(self.folder / R.CHECKPOINTS / name)
            dist.barrier(env)
            self.load(R.checkpoint_dir(self.folder, "last"))
            state = self.state
            if env.main:
                state["rows"] = R.truncate_metrics(self.folder, state["rows"])
        else:
            self.folder = Path(dist.broadcast_object(
                str(R.new_run_dir(out, self.cfg.name)) if env.main else None, env))
            if env.main:
                R.atomic_write(self.folder / R.CONFIG, self.cfg.to_yaml())
            if hasattr(self.model, "init_from_data"):  # data-dependent init (e.g. patch whitening)
                self.model.init_from_data(self.prepare(self.split("train")[0][:5000].to(env.device)))
                if self.ema:
                    self.ema = EMA(self.model, t.ema)
        if resume_dir is None:
            torch.manual_seed(t.seed * 7919 + env.rank)  # each process its own dropout stream
        self.tracker = tracker = Tracker(self.folder if env.main else None, t.tensorboard,
                                         purge_step=state["step"] + 1, rows=state["rows"],
                                         elapsed=state["wall_time"])
        net = self.model
        if env.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        eager, compiling = net, t.compile
        if t.compile:
            net = torch.compile(net)
        self.eval_names = [s for s in t.eval_splits if s in self.data.splits]
        evaluating = self.eval_names and (t.eval_every or t.eval_every_steps)
        self.progress.write(f"run {self.folder}: {self.cfg.model.name} on {self.cfg.data.name}, "
                            f"{sum(p.numel() for p in self.model.parameters()):,} parameters, "
                            f"{env.device.type} x{env.world}, {self.precision}")
        logged: dict[str, float] = {}
        sums: dict[str, torch.Tensor] = {}
        since, t_log = 0, time.perf_counter()
        for epoch in range(state["epoch"], self.epochs):
            if state["stopped"]:  # early stopping decided before an interruption
                break
            remaining = min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)
            self.progress.start(epoch, self.epochs, remaining, state["batch"])
            self.t_mark = t_log = time.perf_counter()
            for i, (x, y) in enumerate(self.loader.epoch(epoch, start=state["batch"]), start=state["batch"]):
                if i >= remaining:
                    break
                set_lr(self.opt, state["step"], self.total, self.steps_per_epoch, t)
                try:
                    out = self.step(net, x, y)
                except UserError:
                    raise
                except Exception as e:  # compilation happens on the first call: fall back to eager mode
                    if not compiling:
                        raise
                    self.progress.write(f"warning: torch.compile failed ({e.__class__.__name__}: "
                                        f"{str(e).splitlines()[0][:200]}); continuing without compilation")
                    net = eager
                    self.opt.zero_grad()
                    out = self.step(net, x, y)
                compiling = False
                for k, v in out.items():
                    sums[k] = sums.get(k, 0) + v
                state["step"] += 1
                state["batch"] = i + 1
                state["samples"] += len(x) * env.world
                since += 1
                log_now = state["step"] % t.log_every == 0 or state["batch"] == remaining
                eval_now = evaluating and t.eval_every_steps and state["step"] % t.eval_every_steps == 0
                save_now = t.checkpoint_every and state["step"] % t.checkpoint_every == 0
                if log_now or eval_now or save_now:
                    self.check_finite()  # before anything of a diverged step is logged or saved
                if log_now:
                    dt = time.perf_counter() - t_log
                    sums = dist.all_reduce(sums, env)  # every process's shard
                    logged = {f"train/{k}": v.item() / since / env.world for k, v in sums.items()}
                    logged["train/lr"] = self.opt.param_groups[0]["lr"]
                    logged["perf/samples_per_s"] = since * t.batch_size / dt
                    tracker.log(state["step"], logged, epoch=epoch + (i + 1) / self.steps_per_epoch)
                    self.progress.update(since, logged)
                    sums, since, t_log = {}, 0, time.perf_counter()
                if eval_now or save_now:  # off the training clock
                    self.tick()
                    if eval_now:
                        self.validate(tracker)
                    if save_now and not state["stopped"]:  # (a stop saves at the epoch's end, below)
                        self.save("last")
                    self.t_mark = t_log = time.perf_counter()
                    if state["stopped"]:
                        break
            self.tick()
            state["epoch"], state["batch"] = epoch + 1, 0
            if evaluating and t.eval_every and (epoch + 1) % t.eval_every == 0:
                self.validate(tracker)
            self.save("last")
            self.progress.end(epoch, self.epochs, {k.split("/")[1]: v for k, v in logged.items()
                                                   if k in ("train/loss", "train/acc")} | self.last_val)
            if state["stopped"]:
                self.progress.write(f"early stopping: no improvement of {t.monitor} in {t.early_stopping} evaluations")
                break
        return self.finish(tracker)

    def tick(self) -> None:
        """Add the time since the last mark to the training time (evaluations and checkpoints excluded)."""
        now = time.perf_counter()
        self.state["train_time"] += now - self.t_mark
        self.t_mark = now

    def step(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulate` micro-batches; returns the detached task outputs. A task with
        an `update(model, batch, optimizers)` method makes the whole step itself (a GAN's alternating updates)."""
        t = self.t
        out: dict[str, torch.Tensor] = {}
        if hasattr(self.task, "update"):
            with autocast(self.env.device, self.precision):
                out = {k: v.detach().float() for k, v in self.task.update(net, (x, y), self.opt).items()}
        else:
            chunks = list(zip(x.tensor_split(t.accumulate), y.tensor_split(t.accumulate), strict=True))
            for j, (xm, ym) in enumerate(chunks):
                sync = j == len(chunks) - 1 or not hasattr(net, "no_sync")
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast(self.env.device,
                                                                                     self.precision):
                    res = self.task.step(net, (xm, ym))
                self.scaler.scale(res["loss"] / t.accumulate).backward()
                for k, v in res.items():
                    out[k] = out.get(k, 0) + v.detach().float() / t.accumulate
            if t.grad_clip:
                for o in self.opt.opts if self.scaler.is_enabled() else []:
                    self.scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            for o in self.opt.opts:
                self.scaler.step(o)
            self.scaler.update()
            self.opt.zero_grad()
        self.first_bad = torch.where(torch.isfinite(out["loss"]), self.first_bad,
                                     self.first_bad.clamp(max=self.state["step"] + 1))  # no sync here
        if self.ema:
            self.ema.update(self.model)
        return out

    def check_finite(self) -> None:
        """Stop at the first step whose loss was NaN/inf on any process; called before logging or saving."""
        step = int(dist.all_reduce({"s": self.first_bad.clone()}, self.env, op="min")["s"].item())
        if step == NEVER:
            return
        last = self.folder / R.CHECKPOINTS / "last"
        keep = f"the last good checkpoint ({last}) is intact" if last.exists() else "no checkpoint was written yet"
        raise Diverged(f"loss is not finite (NaN or inf) at step {step}: training stopped; {keep}. Lower "
                       f"train.lr, set train.grad_clip, or check the data for bad values")

    def validate(self, tracker: Tracker) -> None:
        """Evaluate on `eval_splits`, log, keep the best checkpoint; sets state `stopped` when early
        stopping says so."""
        t, state = self.t, self.state
        if state["validated"] == state["step"]:  # a step-wise evaluation at an epoch's end: done already
            return
        state["validated"] = state["step"]
        self.sync_buffers()
        logged: dict[str, float] = {}
        for split in self.eval_names:
            metrics, _ = self.eval_split(split, final=False)
            logged |= {f"{split}/{k}": v for k, v in metrics.items()}
        tracker.log(state["step"], logged, epoch=state["step"] / self.steps_per_epoch,
                    train_time=round(state["train_time"], 3))
        self.last_val = {k.replace("/", "_"): v for k, v in logged.items() if k.endswith(("/loss", "/acc"))}
        if not t.monitor:
            return
        if t.monitor not in logged:
            raise UserError(f"train.monitor='{t.monitor}' is not among the evaluated metrics: {', '.join(logged)}")
        value = logged[t.monitor]
        sign = -1 if t.monitor.endswith("loss") else 1
        if state["best"] is None or sign * value > sign * state["best"]:
            state["best"], state["best_step"], state["bad_evals"] = value, state["step"], 0
            self.save("best", logged)
        else:
            state["bad_evals"] += 1
        state["stopped"] = bool(t.early_stopping) and state["bad_evals"] >= t.early_stopping

    def eval_split(self, split: str, final: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Metrics and statistics of the current weights on `split`, computed once per step (the final
        evaluation reuses the last epoch's when the weights and the kind of evaluation are the same)."""
        if self.evals_step != self.state["step"]:
            self.evals, self.evals_step = {}, self.state["step"]
        if (split, final) not in self.evals:
            self.evals[split, final] = evaluate(self.eval_model(), self.task, self.eval_loader(split), self.env,
                                                self.precision, final)
        return self.evals[split, final]

    def finish(self, tracker: Tracker) -> Path:
        """Evaluate the best weights on the final splits; write summary.json and the report."""
        t, env, state = self.t, self.env, self.state
        self.sync_buffers()
        best_dir = self.folder / R.CHECKPOINTS / "best"
        if t.monitor and best_dir.exists():
            self.eval_model().load_state_dict(R.load_weights(best_dir))
            self.evals_step = -1  # other weights: nothing evaluated yet
        final: dict[str, float] = {}
        confusion: dict[str, list] = {}
        for split in t.final_splits:
            if split not in self.data.splits:
                continue
            metrics, stats = self.eval_split(split)
            final |= {f"{split}/{k}": v for k, v in metrics.items()}
            if "confusion" in stats:
                confusion[split] = stats["confusion"].tolist()
        if final:
            tracker.log(state["step"], final, epoch=state["epoch"], train_time=round(state["train_time"], 3))
        tracker.close()
        if env.main:
            import nnlab

            summary = {
                "name": self.cfg.name, "status": "completed", "steps": state["step"], "epochs": state["epoch"],
                "final": final, "best": {"step": state["best_step"], t.monitor: state["best"]} if t.monitor else None,
                "wall_time_s": round(tracker.elapsed(), 3), "train_time_s": round(state["train_time"], 3),
                "samples_per_s": round(state["samples"] / max(state["train_time"], 1e-9), 1),
                "params": sum(p.numel() for p in self.model.parameters()), "device": str(env.device),
                "world_size": env.world, "precision": self.precision, "seed": t.seed,
                "nnlab_version": nnlab.__version__, "torch_version": torch.__version__, "confusion": confusion,
            }
            R.write_json(self.folder / R.SUMMARY, summary)
            from .report import write_report

            write_report(self.folder, self.task, self.eval_model(), self.data, self.prepare)
            for k, v in final.items():
                self.progress.write(f"{k} = {v:.4f}")
        return self.folder
