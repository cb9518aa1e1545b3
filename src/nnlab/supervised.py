"""THE loop for supervised and self-supervised tasks: one explicit loop, readable in one sitting.

The dataset yields opaque batches (the loop moves, splits and counts them), the task owns the objective,
the metrics and the outputs, the model is any registered family, the optimizer any registered one. The loop
handles precision, accumulation, clipping, schedules, EMA, evaluation, best and last checkpoints, early
stopping, the evaluation callback, `init.from`, exact resume and torchrun (DistributedDataParallel).
`Supervised` registers it as the loop `supervised`, with its verbs (evaluate, predict, report).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import dist
from . import run as R
from .config import Config, check
from .data import datasets
from .errors import Diverged, UserError
from .evaluate import autocast, evaluate, peak_flops, resolve_precision
from .infer import Run, evaluate_run, init_from, predict_run, report_run
from .models import CountsFlops, InitFromData, models
from .models import build as build_model
from .optim import EMA, build_optimizer, optimizers, set_lr
from .registry import loops
from .session import LoopConfig, Session
from .tasks import build as build_task
from .tasks import tasks

NEVER = 2**62  # `first_bad` while every loss so far was finite


@dataclass
class TrainConfig(LoopConfig):
    epochs: int = 10  # passes over the training split (a stream sampled by step has none: set max_steps)
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    batch_size: int = 128  # examples per optimizer step, over all processes together
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    schedule: str = "cosine"  # learning-rate schedule: constant | cosine | linear | onecycle
    warmup: float = 0.0  # fraction of all steps spent in linear warm-up (the peak for onecycle)
    min_lr: float = 0.0  # final learning rate as a fraction of the peak
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware has it, else fp32)
    compile: bool = False  # torch.compile the model; falls back to eager if compilation fails
    channels_last: bool = False  # channels-last memory format for conv nets (model and 4-D inputs)
    ema: float = 0.0  # decay of an exponential moving average of weights, evaluated and saved (0: off)
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # evaluated during training (if present)
    eval_every: int = 1  # epochs between evaluations (0: none during training)
    eval_every_steps: int = 0  # also evaluate every this many steps (0: off)
    eval_batch_size: int = 1000  # batch size for evaluation
    final_splits: list[str] = field(default_factory=lambda: ["test"])  # evaluated with the best weights at the end
    monitor: str = "auto"  # metric for the best checkpoint and early stopping; auto: the task's on the first
    #                        eval split (e.g. val/acc); '': the last checkpoint is the best
    early_stopping: int = 0  # stop after this many evaluations without improvement (0: off)
    checkpoint_every: int = 0  # steps between extra checkpoints (0: at epoch ends and evaluations only)
    log_every: int = 50  # steps between train/* log events

    def __post_init__(self) -> None:
        for key in ("epochs", "max_steps", "grad_clip", "ema", "eval_every", "early_stopping", "checkpoint_every",
                    "threads", "eval_every_steps"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        for key in ("batch_size", "accumulate", "log_every", "eval_batch_size"):
            check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        check(self.epochs > 0 or self.max_steps > 0, "train.epochs", "set train.epochs or train.max_steps > 0")
        check(self.batch_size % self.accumulate == 0, "train.accumulate", "must divide train.batch_size")
        check(self.schedule in ("constant", "cosine", "linear", "onecycle"), "train.schedule",
              "must be constant, cosine, linear or onecycle")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", "must be auto, fp32, bf16 or fp16")
        check(0 <= self.warmup < 1 and 0 <= self.min_lr <= 1, "train.warmup", "warmup and min_lr must be in [0, 1)")
        check(self.ema < 1, "train.ema", "must be in [0, 1)")


@dataclass
class InitConfig:
    from_: str = ""  # `init.from`: a run folder (or checkpoint folder) whose matching tensors start this run
    checkpoint: str = "best"  # which checkpoint of that run: best | last

    def __post_init__(self) -> None:
        check(self.checkpoint in ("best", "last"), "init.checkpoint", "must be best or last")


class Stepper:
    """What a task that makes its own update (`Task.update`) steps with: `backward(loss)` and `step(i)`, which
    averages optimizer i's gradients over the processes (the model is not wrapped in DDP for such a task, so
    calling its sub-modules is sound), unscales and clips them, steps and zeroes them."""

    def __init__(self, trainer: Trainer):
        self.t = trainer

    def backward(self, loss: torch.Tensor) -> None:
        self.t.scaler.scale(loss).backward()

    def step(self, i: int) -> None:
        t, opt = self.t, self.t.opt.opts[i]
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if t.env.world > 1 and params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce({"g": flat}, t.env)
            flat /= t.env.world
            for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad.copy_(g.view_as(p))
        if t.t.grad_clip:
            if t.scaler.is_enabled():
                t.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, t.t.grad_clip)
        t.scaler.step(opt)
        opt.zero_grad(set_to_none=True)


class Trainer:
    def __init__(self, cfg: Config, session: Session):
        t, env = cfg.train, session.env
        self.cfg, self.t, self.env, self.session = cfg, t, env, session
        self.precision = resolve_precision(t.precision, env.device)
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
        self.loader = self.data.loader("train", t.batch_size, train=True, seed=t.seed, rank=env.rank,
                                       world=env.world, device=env.device)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0 and not t.max_steps:  # a stream sampled by step: no epochs
            raise UserError(f"dataset '{cfg.data.name}' is sampled by step and has no epochs: set train.max_steps")
        self.total = t.max_steps or t.epochs * self.steps_per_epoch
        self.steps_per_epoch = self.steps_per_epoch or self.total
        self.epochs = math.ceil(self.total / self.steps_per_epoch)
        own = self.task.optimizers(self.model)  # a task with its own optimizers (a GAN: one per player)
        self.custom = own is not None
        if self.custom and t.accumulate > 1:
            raise UserError(f"task '{cfg.task.name}' makes its own update, which accumulation does not apply to: "
                            f"set train.accumulate=1 (and a smaller train.batch_size if memory is short)")
        self.opt = own if self.custom else build_optimizer(self.model, cfg.optim)
        self.stepper = Stepper(self)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16" and env.device.type == "cuda")
        self.ema = EMA(self.model, t.ema) if t.ema else None
        self.eval_names = [s for s in t.eval_splits if s in self.data.splits]
        self.monitor = t.monitor if t.monitor != "auto" else (
            f"{self.eval_names[0]}/{self.task.monitor}" if self.eval_names else "")
        self.higher = self.task.higher_is_better(self.monitor.split("/", 1)[-1])
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None,
                                      "bad_evals": 0, "stopped": "", "validated": -1, "train_time": 0.0,
                                      "samples": 0}
        self.first_bad = torch.tensor(NEVER, device=env.device)  # first step with a non-finite loss
        self.last_val: dict[str, float] = {}  # latest evaluation, shown at epoch ends
        self.evals: dict[tuple[str, bool], tuple[dict, dict]] = {}  # (split, final) -> (metrics, stats) at evals_step
        self.evals_step = -1
        self.flops = self.peak = 0.0  # FLOPs per example (models that count them) and the machine's peak

    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema else self.model

    def eval_loader(self, split: str):
        return self.data.loader(split, self.t.eval_batch_size, rank=self.env.rank, world=self.env.world,
                                device=self.env.device)

    # --- checkpoints ---------------------------------------------------------------------------------
    def sync_buffers(self) -> None:
        for m in (self.model, self.ema.model) if self.ema else (self.model,):
            dist.broadcast_buffers(m, self.env)

    def save(self, name: str, metrics: dict[str, float] | None = None) -> None:
        self.sync_buffers()
        state = {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "state": dict(self.state)}
        if self.ema:
            state["raw_model"] = self.model.state_dict()  # the file's weights are the EMA ones
        self.session.save(name, self.eval_model(), state, self.spec, metrics, self.state["step"], self.state["epoch"])

    def load(self) -> dict[str, Any]:
        weights, st = self.session.load("last")
        try:
            self.eval_model().load_state_dict(weights)
            if self.ema:
                self.model.load_state_dict(st["raw_model"])
            self.opt.load_state_dict(st["optimizer"])
            self.scaler.load_state_dict(st["scaler"])
            self.state = self.state | st["state"]
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"the last checkpoint of {self.session.folder} does not match this run's model/optimizer "
                            f"({str(e).splitlines()[0]})") from None
        return st

    def start(self) -> None:
        """A new run: data-dependent init, then `init.from`'s weights; or a resumed run's checkpoint."""
        t, env, session = self.t, self.env, self.session
        if session.resumed:
            st = self.load()
            session.track(self.state["step"], st["rows"], st["wall_time"])
            return
        if isinstance(self.model, InitFromData):  # e.g. patch whitening from the first 5,000 training images
            self.model.init_from_data(next(iter(self.data.loader("train", 5000, device=env.device).epoch(0))))
        if self.cfg.init.from_:
            table = init_from(self.model, self.cfg.init.from_, self.cfg.init.checkpoint)
            if env.main:
                R.write_json(session.folder / R.INIT, table)
            session.progress.write(f"init.from {table['source']}: {len(table['loaded'])} tensors loaded, "
                                   f"{len(table['new'])} new ({', '.join(table['new'][:6]) or '-'}), "
                                   f"{len(table['skipped'])} skipped ({', '.join(table['skipped'][:6]) or '-'})")
        if self.ema:
            self.ema = EMA(self.model, t.ema)
        torch.manual_seed(t.seed * 7919 + env.rank)  # each process its own dropout stream
        session.track()

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        t, env, state, session = self.t, self.env, self.state, self.session
        self.start()
        state = self.state
        net = self.model
        if env.world > 1 and not self.custom:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        eager, compiling = net, t.compile
        if t.compile:
            net = torch.compile(net)
        evaluating = self.eval_names and (t.eval_every or t.eval_every_steps)
        # MFU: the model's FLOPs per example at the achieved rate over this machine's measured matmul peak
        self.flops = flops = self.model.flops_per_sample() if isinstance(self.model, CountsFlops) else 0.0
        self.peak = peak_flops(env.device, self.precision) * env.world if flops else 0.0
        session.progress.write(f"run {session.folder}: {self.cfg.model.name} on {self.cfg.data.name}, "
                               f"{sum(p.numel() for p in self.model.parameters()):,} parameters, "
                               f"{env.device.type} x{env.world}, {self.precision}")
        shown = ("train/loss", f"train/{self.task.monitor}")
        logged: dict[str, float] = {}
        sums: dict[str, torch.Tensor] = {}
        since = 0
        for epoch in range(state["epoch"], self.epochs):
            if state["stopped"]:  # a stop decided before an interruption
                break
            remaining = min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)
            session.progress.start(epoch, self.epochs, remaining, state["batch"])
            self.t_mark = t_log = time.perf_counter()
            for i, batch in enumerate(self.loader.epoch(epoch, start=state["batch"]), start=state["batch"]):
                if i >= remaining:
                    break
                batch = batch.to(env.device, channels_last=t.channels_last)
                set_lr(self.opt, state["step"], self.total, self.steps_per_epoch, t)
                try:
                    out = self.step(net, batch)
                except UserError:
                    raise
                except Exception as e:  # compilation happens on the first call: fall back to eager mode
                    if not compiling:
                        raise
                    session.progress.write(f"warning: torch.compile failed ({e.__class__.__name__}: "
                                           f"{str(e).splitlines()[0][:200]}); continuing without compilation")
                    net = eager
                    self.opt.zero_grad()
                    out = self.step(net, batch)
                compiling = False
                for k, v in out.items():
                    sums[k] = sums.get(k, 0) + v
                state["step"] += 1
                state["batch"] = i + 1
                state["samples"] += len(batch) * env.world
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
                    if flops:
                        logged["perf/mfu"] = flops * logged["perf/samples_per_s"] / self.peak
                    session.tracker.log(state["step"], logged, epoch=epoch + (i + 1) / self.steps_per_epoch)
                    session.progress.update(since, logged)
                    sums, since, t_log = {}, 0, time.perf_counter()
                if eval_now or save_now:  # off the training clock
                    self.tick()
                    if eval_now:
                        self.validate()
                    if save_now and not state["stopped"]:  # (a stop saves at the epoch's end, below)
                        self.save("last")
                    self.t_mark = t_log = time.perf_counter()
                    if state["stopped"]:
                        break
            self.tick()
            state["epoch"], state["batch"] = epoch + 1, 0
            if evaluating and t.eval_every and (epoch + 1) % t.eval_every == 0:
                self.validate()
            self.save("last")
            session.progress.end(epoch, self.epochs, {k.split("/")[1]: v for k, v in logged.items() if k in shown}
                                 | self.last_val)
            if state["stopped"]:
                session.progress.write(f"stopped: {state['stopped']}")
                break
        return self.finish()

    def tick(self) -> None:
        """Add the time since the last mark to the training time (evaluations and checkpoints excluded)."""
        now = time.perf_counter()
        self.state["train_time"] += now - self.t_mark
        self.t_mark = now

    def step(self, net: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulate` micro-batches; returns the detached task outputs. A task with its
        own optimizers makes the whole step itself (`Task.update`: a GAN's alternating players)."""
        t = self.t
        out: dict[str, torch.Tensor] = {}
        if self.custom:
            with autocast(self.env.device, self.precision):
                res = self.task.update(net, batch, self.opt, self.stepper)
            out = {k: v.detach().float() for k, v in res.items()}
            self.scaler.update()
        else:
            parts = batch.split(t.accumulate) if t.accumulate > 1 else [batch]
            for j, part in enumerate(parts):
                sync = j == len(parts) - 1 or not hasattr(net, "no_sync")  # (DDP's method, not a task hook)
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast(self.env.device,
                                                                                     self.precision):
                    res = self.task.step(net, part)
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
        last = self.session.folder / R.CHECKPOINTS / "last"
        keep = f"the last good checkpoint ({last}) is intact" if last.exists() else "no checkpoint was written yet"
        raise Diverged(f"loss is not finite (NaN or inf) at step {step}: training stopped; {keep}. Lower "
                       f"optim.lr, set train.grad_clip, or check the data for bad values")

    def validate(self) -> None:
        """Evaluate on `eval_splits`, log, keep the best checkpoint; sets state `stopped` (with the reason)
        when early stopping or the evaluation callback says so."""
        t, state = self.t, self.state
        if state["validated"] == state["step"]:  # a step-wise evaluation at an epoch's end: done already
            return
        state["validated"] = state["step"]
        self.sync_buffers()
        logged: dict[str, float] = {}
        for split in self.eval_names:
            metrics, _ = self.eval_split(split, final=False)
            logged |= {f"{split}/{k}": v for k, v in metrics.items()}
        self.session.tracker.log(state["step"], logged, epoch=state["step"] / self.steps_per_epoch,
                                 train_time=round(state["train_time"], 3))
        if self.env.main:  # the task's files of this evaluation (text samples, sample grids)
            model, was = self.eval_model(), self.eval_model().training
            self.task.artifacts(model, self.session.folder, state["step"], self.data)
            model.train(was)
        self.last_val = {k.replace("/", "_"): v for k, v in logged.items()
                         if k.split("/", 1)[1] in ("loss", self.task.monitor)}
        if self.monitor:
            if self.monitor not in logged:
                raise UserError(f"train.monitor='{self.monitor}' is not among the evaluated metrics: "
                                f"{', '.join(logged)}")
            value, sign = logged[self.monitor], 1 if self.higher else -1
            if state["best"] is None or sign * value > sign * state["best"]:
                state["best"], state["best_step"], state["bad_evals"] = value, state["step"], 0
                self.save("best", logged)
            else:
                state["bad_evals"] += 1
            if t.early_stopping and state["bad_evals"] >= t.early_stopping:
                state["stopped"] = f"no improvement of {self.monitor} in {t.early_stopping} evaluations"
        if self.session.evaluated(state["step"], logged):
            state["stopped"] = "the evaluation callback asked to stop"

    def eval_split(self, split: str, final: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics and statistics of the current weights on `split`, computed once per step (the final
        evaluation reuses the last epoch's when the weights and the kind of evaluation are the same)."""
        if self.evals_step != self.state["step"]:
            self.evals, self.evals_step = {}, self.state["step"]
        if (split, final) not in self.evals:
            self.evals[split, final] = evaluate(self.eval_model(), self.task, self.eval_loader(split), self.env,
                                                self.precision, final)
        return self.evals[split, final]

    def finish(self) -> dict[str, float]:
        """Evaluate the best weights on the final splits; write summary.json and the report."""
        t, env, state, session = self.t, self.env, self.state, self.session
        self.sync_buffers()
        best_dir = session.folder / R.CHECKPOINTS / "best"
        if self.monitor and best_dir.exists():
            self.eval_model().load_state_dict(R.load_weights(best_dir))
            self.evals_step = -1  # other weights: nothing evaluated yet
        final: dict[str, float] = {}
        stats: dict[str, dict[str, Any]] = {}
        for split in (s for s in t.final_splits if s in self.data.splits):
            metrics, stats[split] = self.eval_split(split)
            final |= {f"{split}/{k}": v for k, v in metrics.items()}
        if final:
            session.tracker.log(state["step"], final, epoch=state["epoch"], train_time=round(state["train_time"], 3))
        session.write_summary({
            "status": "stopped" if state["stopped"] else "completed", "stop_reason": state["stopped"] or None,
            "steps": state["step"], "epochs": state["epoch"], "final": final,
            "best": {"metric": self.monitor, "value": state["best"], "step": state["best_step"],
                     "higher_is_better": self.higher} if self.monitor else None,
            "train_time_s": round(state["train_time"], 3),
            "samples_per_s": round(state["samples"] / max(state["train_time"], 1e-9), 1),
            "mfu": round(self.flops * state["samples"] / max(state["train_time"], 1e-9) / self.peak, 4)
            if self.flops else None,
            "params": sum(p.numel() for p in self.model.parameters()), "precision": self.precision,
            "task": self.task.summary(stats)})
        if env.main:
            report_run(Run(session.folder), self.eval_model(), self.task, self.data)
            for k, v in final.items():
                session.progress.write(f"{k} = {v:.4f}")
        return final


@loops.register("supervised")
class Supervised:
    """Supervised and self-supervised training of a model on a dataset with a task (every family but RL)."""

    sections = {"data": datasets, "model": models, "task": tasks, "optim": optimizers, "train": TrainConfig,
                "init": InitConfig}
    defaults = {"optim": "adamw"}

    @staticmethod
    def train(cfg: Config, session: Session) -> dict[str, float]:
        return Trainer(cfg, session).run()

    evaluate = staticmethod(evaluate_run)
    predict = staticmethod(predict_run)
    report = staticmethod(report_run)
