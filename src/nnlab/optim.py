"""Optimizers, learning-rate schedules and the exponential moving average of weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """Split the trainable parameters by a general rule:
    - `optimizer=muon`: Muon for the hidden >=2-D weights (every matrix/filter but the model's first
      layer and its head, which stay with SGD, as in Jordan's Muon recipe);
    - weight decay on >=2-D weights, and on biases and norm parameters too when `decay_biases` is set;
    - the head (the last >=2-D weight) at learning rate `head_lr` when that is set;
    - parameters named '*.whiten.bias' on a short schedule of their own when `freeze_bias_after` is set.
    A model may instead define `param_groups()` itself."""
    if hasattr(model, "param_groups"):
        return model.param_groups()
    matrices = [n for n, p in model.named_parameters() if p.ndim >= 2]
    first, head = (matrices[0], matrices[-1]) if matrices else (None, None)
    groups: dict[str, list] = {"muon": [], "decay": [], "no_decay": [], "head": [], "short": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n == head and cfg.head_lr:
            groups["head"].append(p)
        elif cfg.optimizer == "muon" and p.ndim >= 2 and n not in (first, head):
            groups["muon"].append(p)
        elif cfg.freeze_bias_after and n.endswith("whiten.bias"):
            groups["short"].append(p)
        else:
            groups["decay" if p.ndim >= 2 or cfg.decay_biases else "no_decay"].append(p)
    bias_wd = cfg.weight_decay if cfg.decay_biases else 0.0
    out = [{"params": groups["decay"], "weight_decay": cfg.weight_decay},
           {"params": groups["no_decay"], "weight_decay": 0.0},
           {"params": groups["head"], "weight_decay": cfg.weight_decay, "lr_scale": cfg.head_lr / cfg.lr},
           {"params": groups["short"], "weight_decay": bias_wd, "epochs": cfg.freeze_bias_after},
           {"params": groups["muon"], "optimizer": "muon"}]
    return [g for g in out if g["params"]]


class Optimizers:
    """One or two torch optimizers stepped together (Muon for matrices beside SGD/AdamW for the rest)."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states: list[dict]) -> None:
        for o, s in zip(self.opts, states, strict=True):
            o.load_state_dict(s)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]


def build_optimizer(model: nn.Module, cfg: Any) -> Optimizers:
    groups = param_groups(model, cfg)
    rest = [g for g in groups if g.get("optimizer") != "muon"]
    for g in groups:
        g.setdefault("base_lr", cfg.lr * g.pop("lr_scale", 1.0))
        g["lr"] = g["base_lr"]
        if cfg.decouple_wd and g.get("weight_decay"):  # the fraction removed per step, whatever the group's lr
            g["weight_decay"] /= g["base_lr"]
    opts: list[torch.optim.Optimizer] = []
    if cfg.optimizer in ("sgd", "muon"):
        opts.append(torch.optim.SGD(rest, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay))
    else:
        opts.append(torch.optim.AdamW(rest, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay))
    muon = [g for g in groups if g.get("optimizer") == "muon"]
    if muon:
        from .muon import Muon

        for g in muon:
            g["base_lr"] = g["lr"] = cfg.muon_lr
        opts.append(Muon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                         ns_steps=cfg.muon_ns_steps, normalize_weights=cfg.muon_normalize))
    return Optimizers(opts)


def lr_factor(step: int, total: int, cfg: Any) -> float:
    """Multiplier of the base learning rate at `step` of `total`: linear warm-up over the first
    `warmup` fraction, then constant, cosine or linear decay to `min_lr`. `onecycle` is the triangular
    form of Smith & Topin 2018: linear up (30% of the steps unless `warmup` says otherwise), then down."""
    warm = int((cfg.warmup or (0.3 if cfg.schedule == "onecycle" else 0.0)) * total)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule in ("linear", "onecycle"):
        return 1 - (1 - cfg.min_lr) * t
    return 1.0


def set_lr(opt: Optimizers, step: int, total: int, steps_per_epoch: int, cfg: Any) -> None:
    """Every group follows the schedule, except groups with an `epochs` key: their learning rate decays
    linearly to zero over that many epochs (airbench's whitening bias), after which they stay fixed."""
    factor = lr_factor(step, total, cfg)
    for g in opt.param_groups:
        short = g.get("epochs")
        g["lr"] = g["base_lr"] * (max(0.0, 1 - step / (short * steps_per_epoch)) if short else factor)


class EMA:
    """Exponential moving average of parameters and buffers, evaluated in place of the raw weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = _copy(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema
