"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration.

Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
https://kellerjordan.github.io/posts/muon/ . For each weight matrix W (a conv kernel is flattened to
(out, in*kh*kw)) the momentum-averaged gradient G = U S V^T is replaced by roughly U V^T, so every
direction of the update gets the same size. Meant for the hidden ≥2-D weights; embeddings, heads,
biases and norm parameters should go to a conventional optimizer (SGD, AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class MuonConfig:
    """The `optim` section for Muon: Muon on the hidden >=2-D weights, Nesterov SGD (or AdamW) on every other
    group."""

    name: str = "muon"
    rest: str = "sgd"  # optimizer of the other groups: sgd (airbench's convnets) | adamw (Transformers' embeddings)
    lr: float = 0.1  # peak learning rate of the other groups (biases, norm parameters, first layer, head)
    momentum: float = 0.9  # SGD momentum (Nesterov when `nesterov`)
    nesterov: bool = True  # Nesterov momentum for the SGD groups
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW moment decay rates (rest=adamw)
    weight_decay: float = 0.0  # L2 weight decay of the SGD groups that decay; none on Muon's
    decoupled: bool = False  # weight_decay is the fraction removed per step at peak, whatever the group's lr
    muon_lr: float = 0.02  # learning rate of Muon's group
    muon_momentum: float = 0.95  # Muon momentum (Nesterov)
    ns_steps: int = 5  # Newton-Schulz iterations orthogonalising each update
    normalize: bool = False  # rescale each Muon weight to Frobenius norm sqrt(rows) before its step (airbench)

    def __post_init__(self) -> None:
        from .errors import UserError

        if not (self.lr > 0 and self.muon_lr > 0 and self.weight_decay >= 0 and self.ns_steps >= 1):
            raise UserError("bad value in config section 'optim': muon needs lr > 0, muon_lr > 0, "
                            "weight_decay >= 0 and ns_steps >= 1")
        if self.rest not in ("sgd", "adamw"):
            raise UserError(f"bad value for config key 'optim.rest': must be sgd or adamw (got '{self.rest}')")

# Quintic Newton–Schulz coefficients from the Muon write-up: chosen to maximise the slope at zero, so
# small singular values grow fast; after 5 steps they land in roughly [0.7, 1.2], not exactly 1 (after 3,
# as airbench uses, the smallest can still be lower, ~0.4); that does not hurt training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for `g` = U S V^T (2-D, or a batch (n, rows, cols) of same-shaped matrices, each
    orthogonalised on its own), by `steps` quintic Newton–Schulz iterations.

    `dtype` is the working precision; None picks bf16 on CUDA and fp32 elsewhere (on a CPU without native
    bf16, bf16 matmuls are ~40x slower than fp32: 830 ms vs 20 ms for 3 steps on a 256x2304 matrix).
    Returns a tensor of `g`'s shape in the working precision.
    """
    assert g.ndim in (2, 3), g.shape
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius >= spectral norm: singular values <= 1
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller one
    for _ in range(steps):
        gram = x @ x.mT  # (..., r, r), r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x  # p(x) = a x + b x x^T x + c (x x^T)^2 x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum (optionally Nesterov) on the raw gradient, then `orthogonalize`, then a step of size `lr`.

    Parameters must have ≥2 dims; dims after the first are flattened, so a conv kernel (out, in, kh, kw)
    is treated as an (out, in*kh*kw) matrix. The orthogonalised update is scaled by
    sqrt(max(1, rows/cols)) (as in Keller Jordan's reference implementation), i.e. 1 for wide matrices.

    weight_decay is decoupled: w <- w * (1 - lr * weight_decay) before the update.
    normalize_weights rescales each weight to Frobenius norm sqrt(rows) before every step (airbench does
    this): for weights followed by a normalisation layer, whose scale does not change the function, it
    stops the weight norm from growing and so fixes the effective step size.
    ns_dtype: the Newton–Schulz working precision; None = bf16 on CUDA, fp32 elsewhere.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        normalize_weights: bool = False,
        ns_dtype: torch.dtype | None = None,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"invalid Muon settings: lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} ns_steps={ns_steps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            normalize_weights=normalize_weights,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs parameters with >= 2 dims, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            same: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}  # (rows, cols) -> [(param, update)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if mom:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(mom).add_(g)  # buf = m * buf + g
                    g = g.add(buf, alpha=mom) if group["nesterov"] else buf
                rows, cols = p.size(0), p[0].numel()
                if group["normalize_weights"]:
                    p.mul_(rows**0.5 / (p.norm() + 1e-12))
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                same.setdefault((rows, cols), []).append((p, g.reshape(rows, cols)))  # a conv kernel flattened
            for (rows, cols), pairs in same.items():  # one batched Newton-Schulz per shape (fewer, larger matmuls)
                updates = orthogonalize(torch.stack([g for _, g in pairs]), group["ns_steps"], group["ns_dtype"])
                scale = max(1.0, rows / cols) ** 0.5
                for (p, _), u in zip(pairs, updates, strict=True):
                    p.add_(u.view_as(p).to(p.dtype), alpha=-lr * scale)
        return loss
