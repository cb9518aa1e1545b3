"""FastNet: an airbench-style speed net for small images (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds
on a single GPU", arXiv:2404.00498; descended from tysam-code's hlb-CIFAR10).

    patch-whitening conv (frozen, set from data) -> GELU
    -> groups of [conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU]
    -> global max-pool -> linear head (unit-std weights) * head_scale

The first layer is a fixed k x k convolution whose filters are the eigenvectors of the training
images' k x k patch covariance, scaled by 1/sqrt(eigenvalue + eps), plus their negations: its output
patches are decorrelated with unit variance. `init_from_data(x)` sets it; only its bias trains.

Meant to be trained with Muon (`nnlab.muon.Muon`) on the 4-D conv kernels of the groups and Nesterov
SGD on the rest (BN shifts, whitening bias, head), with label smoothing, alternating flips, random
translation and flip/translate test-time augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.image import ImageSpec
from . import CIFAR, models


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale is optionally frozen at 1 (then only the shift, `bias`, is trained)."""

    def __init__(self, channels: int, momentum: float, eps: float, learn_weight: bool):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(learn_weight)


class Conv(nn.Conv2d):
    """3x3 'same' convolution without bias; optionally identity (Dirac) init of the first c_in filters."""

    def __init__(self, c_in: int, c_out: int, dirac: bool):
        self.dirac = dirac
        super().__init__(c_in, c_out, kernel_size=3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # PyTorch default (Kaiming-uniform) for every filter
        if self.dirac:
            w = self.weight.data  # (c_out, c_in, 3, 3)
            nn.init.dirac_(w[: w.size(1)])  # filter i < c_in passes input channel i through unchanged


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU: halves the resolution."""

    def __init__(self, c_in: int, c_out: int, cfg: FastNetConfig):
        super().__init__()
        bn = dict(momentum=cfg.bn_momentum, eps=cfg.bn_eps, learn_weight=cfg.bn_weight)
        self.conv1 = Conv(c_in, c_out, cfg.dirac_init)
        self.norm1 = BatchNorm(c_out, **bn)
        self.conv2 = Conv(c_out, c_out, cfg.dirac_init)
        self.norm2 = BatchNorm(c_out, **bn)

    def forward(self, x: Tensor) -> Tensor:  # (B, c_in, H, W) -> (B, c_out, H/2, W/2)
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


class PatchWhiten(nn.Conv2d):
    """k x k conv, no padding, 2*C*k*k filters: the whitening directions of the patches and their negations.

    The weight is frozen (requires_grad=False) and set by `init_from_data`; the bias (PyTorch's default
    uniform init) is trainable. Parameter names end in `whiten.weight` / `whiten.bias`.
    """

    def __init__(self, channels: int, patch: int, eps: float):
        self.eps = eps
        self.dim = channels * patch * patch  # d = C*k*k values per patch
        # (B, C, H, W) -> (B, 2d, H-k+1, W-k+1)
        super().__init__(channels, 2 * self.dim, patch, padding=0, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, chunk: int = 500) -> None:
        """Set the filters from images x (N, C, H, W), already normalised like the training inputs."""
        k = self.kernel_size[0]
        with torch.autocast(x.device.type, enabled=False):
            cov = x.new_zeros(self.dim, self.dim, dtype=torch.float32)
            n = 0
            for xb in x.split(chunk):
                p = F.unfold(xb.float(), k)  # (b, d, L): every k x k patch, (C, kh, kw) order like a kernel
                p = p.transpose(1, 2).reshape(-1, self.dim)  # (b*L, d)
                cov += p.T @ p  # uncentred second moment, as in airbench
                n += len(p)
            cov = cov.cpu().double() / n  # eigh on the CPU in fp64: tiny (d x d), and works for every device
            evals, evecs = torch.linalg.eigh(cov)  # ascending eigenvalues; eigenvectors are the columns
            # (d, d): row i projects a patch onto eigenvector i and rescales its variance to ~1
            w = evecs.T / torch.sqrt(evals + self.eps)[:, None]
            w = w.reshape(self.dim, *self.weight.shape[1:])  # (d, C, k, k)
        self.weight.copy_(torch.cat([w, -w]).to(self.weight))  # (2d, C, k, k)


@dataclass
class FastNetConfig:
    name: str = "fastnet"  # registered model to build
    widths: list[int] = field(default_factory=lambda: [64, 256, 256])  # channels of each conv group
    whiten_patch: int = 2  # patch size k of the whitening layer (2*C*k*k output channels: 24 for RGB, k=2)
    whiten_eps: float = 5e-4  # added to each patch-covariance eigenvalue before 1/sqrt (limits noise gain)
    bn_momentum: float = 0.4  # running-stats weight of each new batch (PyTorch convention; airbench's 0.6)
    bn_eps: float = 1e-12  # BatchNorm epsilon
    bn_weight: bool = False  # train the BatchNorm scale; airbench keeps it at 1 and trains only the shift
    dirac_init: bool = True  # initialise the first c_in filters of every 3x3 conv as the identity
    head_scale: float | None = None  # logits = head(features) * head_scale; None = 1 / widths[-1]
    head_lr: float = 0.0  # peak learning rate of the head (absolute); 0: the optimizer's lr
    whiten_bias_epochs: int = 0  # the whitening bias's lr decays linearly to 0 over this many epochs (0: schedule)

    def __post_init__(self) -> None:
        if not self.widths or self.whiten_patch < 1:
            raise ValueError("fastnet needs at least one width and a whitening patch size >= 1")


class FastNet(nn.Module):
    def __init__(self, cfg: FastNetConfig, in_channels: int, num_classes: int):
        super().__init__()
        self.whiten = PatchWhiten(in_channels, cfg.whiten_patch, cfg.whiten_eps)
        c, groups = 2 * self.whiten.dim, []
        for width in cfg.widths:
            groups.append(ConvGroup(c, width, cfg))
            c = width
        self.groups = nn.Sequential(*groups)  # (B, 2d, H', W') -> (B, c, H'/2^n, W'/2^n)
        self.head = nn.Linear(c, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.div_(self.head.weight.std())  # unit-std head weights, scaled down by head_scale
        self.head_scale = cfg.head_scale if cfg.head_scale is not None else 1.0 / c
        self.head_lr, self.whiten_bias_epochs = cfg.head_lr, cfg.whiten_bias_epochs

    def param_groups(self) -> list[dict]:
        """airbench's optimizer split: Muon on the groups' conv filters, weight decay on everything (biases
        too), the head at its own learning rate, the whitening bias on a short schedule of its own."""
        filters = [p for p in self.groups.parameters() if p.ndim == 4]
        norms = [p for p in self.groups.parameters() if p.ndim < 4 and p.requires_grad]
        bias = {"params": [self.whiten.bias], "decay": True}
        if self.whiten_bias_epochs:
            bias["epochs"] = self.whiten_bias_epochs
        head = {"params": [self.head.weight], "decay": True} | ({"lr": self.head_lr} if self.head_lr else {})
        return [{"params": norms, "decay": True}, head, bias, {"params": filters, "optimizer": "muon"}]

    def init_from_data(self, batch) -> None:
        """Data-dependent init of the whitening layer from a batch of normalised training images `x`."""
        self.whiten.init_from_data(batch["x"])

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) normalised images -> (B, num_classes) logits
        x = F.gelu(self.whiten(x))  # (B, 2d, H-k+1, W-k+1)
        x = self.groups(x)  # (B, c, h, w)
        x = x.amax(dim=(2, 3))  # global max-pool: (B, c)
        return self.head(x) * self.head_scale


@models.register("fastnet", config=FastNetConfig, example=CIFAR)
def fastnet(cfg: FastNetConfig, spec: ImageSpec) -> nn.Module:
    """Airbench-style speed net: frozen patch whitening, BN+GELU conv groups with max-pooling (CIFAR-10)."""
    c, h, w = spec.input_shape
    smallest = (min(h, w) - cfg.whiten_patch + 1) // 2 ** len(cfg.widths)
    if smallest < 1:
        from ..errors import UserError

        raise UserError(
            f"model.widths has {len(cfg.widths)} groups, each halving the image, but the "
            f"images are only {h}x{w}: use fewer groups"
        )
    return FastNet(cfg, c, spec.num_classes)
