"""Optimizers (a registry: each entry with its own config section `optim`), learning-rate schedules and the
exponential moving average of weights.

    optim: {name: adamw, lr: 1e-3, weight_decay: 0.05}
    optim: {name: muon, lr: 0.1, muon_lr: 0.24}      # Muon on hidden matrices, Nesterov SGD on the rest

Parameter groups come from the model's `param_groups()` when it has one (a recipe's own rules live with its
model), else from one general rule (`param_groups`). A group may say `decay: False`, an absolute `lr`,
`optimizer: "muon"`, or `epochs: n` (its learning rate decays linearly to zero over n epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .config import check
from .muon import Muon, MuonConfig
from .registry import Registry

optimizers = Registry("optimizer")


@runtime_checkable
class HasParamGroups(Protocol):
    def param_groups(self) -> list[dict[str, Any]]: ...


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 0.0  # L2 weight decay on the groups that decay (>=2-D weights by default)
    decoupled: bool = False  # weight_decay is the fraction of a weight removed per step at peak, for every group
    #                          alike whatever its lr (Loshchilov & Hutter; airbench's SGD); default: times the lr

    def __post_init__(self) -> None:
        check(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "must be a positive number")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")


@dataclass
class AdamWConfig:
    name: str = "adamw"
    lr: float = 1e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # moment decay rates
    weight_decay: float = 0.0  # decoupled weight decay on the groups that decay (>=2-D weights by default)

    def __post_init__(self) -> None:
        check(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "must be a positive number")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(len(self.betas) == 2, "optim.betas", "must be two numbers, e.g. [0.9, 0.999]")


def param_groups(model: nn.Module, muon: bool = False) -> list[dict[str, Any]]:
    return model.param_groups() if isinstance(model, HasParamGroups) else general_groups(model, muon)


def general_groups(model: nn.Module, muon: bool = False) -> list[dict[str, Any]]:
    """The general rule: decay on >=2-D weights, none on biases and norm parameters; with `muon`, the hidden
    >=2-D weights (every matrix/filter but the first layer's and the head's) go to Muon (Jordan's recipe)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [n for n, p in model.named_parameters() if p.ndim >= 2]
    ends = (matrices[0], matrices[-1]) if matrices else ()
    hidden = [p for n, p in named if muon and p.ndim >= 2 and n not in ends]
    ids = {id(p) for p in hidden}
    groups = [{"params": [p for _, p in named if p.ndim >= 2 and id(p) not in ids], "decay": True},
              {"params": [p for _, p in named if p.ndim < 2], "decay": False},
              {"params": hidden, "optimizer": "muon"}]
    return [g for g in groups if g["params"]]


class Optimizers:
    """One or more torch optimizers stepped together (Muon for matrices beside SGD for the rest; a GAN's two)."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts
        for g in self.param_groups:
            g.setdefault("base_lr", g["lr"])  # the peak the schedule scales

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states: list[dict]) -> None:
        """Restore the state (momenta); the hyperparameters of the current config win over the saved ones."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        for o, s in zip(self.opts, states, strict=True):
            o.load_state_dict(s)
        for g, hyper in zip(self.param_groups, fresh, strict=True):
            g.update(hyper)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]


def _groups(model: nn.Module, cfg: Any, muon: bool) -> tuple[list[dict], list[dict]]:
    """(the conventional optimizer's groups, Muon's), each with lr and weight decay resolved."""
    rest, hidden = [], []
    for g in param_groups(model, muon):
        g = dict(g)
        to_muon = g.pop("optimizer", None) == "muon" and muon  # (without Muon, its groups go to the other)
        g["lr"] = g.get("lr", cfg.muon_lr if to_muon else cfg.lr)
        wd = cfg.weight_decay if g.pop("decay", True) and not to_muon else 0.0
        g["weight_decay"] = wd / g["lr"] if wd and getattr(cfg, "decoupled", False) else wd
        (hidden if to_muon else rest).append(g)
    return rest, hidden


@optimizers.register("sgd", config=SGDConfig)
def sgd(model: nn.Module, cfg: SGDConfig) -> Optimizers:
    """SGD with (Nesterov) momentum."""
    rest, _ = _groups(model, cfg, False)
    return Optimizers([torch.optim.SGD(rest, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)])


@optimizers.register("adamw", config=AdamWConfig)
def adamw(model: nn.Module, cfg: AdamWConfig) -> Optimizers:
    """AdamW (Loshchilov & Hutter 2019); the fused kernel on CPU and CUDA (one pass over all parameters)."""
    rest, _ = _groups(model, cfg, False)
    return Optimizers([torch.optim.AdamW(rest, lr=cfg.lr, betas=tuple(cfg.betas), fused=_fusable(rest))])


def _fusable(groups: list[dict]) -> bool:
    """Whether torch has a fused AdamW kernel for these parameters' devices."""
    return all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])


@optimizers.register("muon", config=MuonConfig)
def muon(model: nn.Module, cfg: MuonConfig) -> Optimizers:
    """Muon on the hidden >=2-D weights, Nesterov SGD or AdamW on the rest (Jordan 2024)."""
    rest, hidden = _groups(model, cfg, True)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SGD(rest, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov) if cfg.rest == "sgd"
        else torch.optim.AdamW(rest, lr=cfg.lr, betas=tuple(cfg.betas), fused=_fusable(rest))]
    if hidden:
        opts.append(Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, ns_steps=cfg.ns_steps,
                         normalize_weights=cfg.normalize))
    return Optimizers(opts)


def build_optimizer(model: nn.Module, cfg: Any) -> Optimizers:
    return optimizers[cfg.name].factory(model, cfg)


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
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)
