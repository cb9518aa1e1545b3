"""SimCLR's networks (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709) on the FastNet backbone, and the linear probe that reads the pretrained encoder.

    simclr:        patch whitening -> GELU -> FastNet conv groups -> global max-pool    (the encoder, h: (B, c))
                   -> projector: Linear -> BN -> ReLU -> Linear                       (z: (B, proj_dim), the loss's)
    simclr-probe:  the same encoder, frozen (no gradients, BatchNorm kept in eval mode)
                   -> BatchNorm1d without affine -> Linear head                       (logits: (B, num_classes))

The encoder is FastNet's (`models/fastnet.py`: `PatchWhiten`, `ConvGroup`, imported, not copied) with FastNet's
tensor names (`whiten.*`, `groups.<i>.conv1.weight`, ...), so `nnlab train cifar10-fast init.from=RUN` fine-tunes a
SimCLR run's encoder and `nnlab train cifar10-linear-probe init.from=RUN` probes it: `init.from` copies every
tensor whose name and shape match; the projector (`projector.*`) is left behind and the classifier's `head.*` starts
new. The whitening filters are part of the copied encoder: they are set from the pretraining data, then the
encoder learned on top of them; the fine-tuning run's own data-dependent whitening (`init_from_data`, computed
first) is overwritten by the checkpoint's, on purpose (eigenvectors of another sample may come out in another
order or sign, which would scramble every filter above them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.image import ImageSpec
from ..errors import UserError
from . import CIFAR, models
from .fastnet import ConvGroup, FastNetConfig, PatchWhiten


@dataclass
class EncoderConfig:
    """FastNet's encoder options, with FastNet's defaults (a run must match the classifier it is loaded into)."""

    name: str = "simclr"  # registered model to build
    widths: list[int] = field(default_factory=lambda: [64, 256, 256])  # channels of each conv group
    whiten_patch: int = 2  # patch size k of the whitening layer (2*C*k*k output channels: 24 for RGB, k=2)
    whiten_eps: float = 5e-4  # added to each patch-covariance eigenvalue before 1/sqrt (limits noise gain)
    bn_momentum: float = 0.4  # running-stats weight of each new batch (PyTorch convention)
    bn_eps: float = 1e-12  # BatchNorm epsilon
    bn_weight: bool = False  # train the BatchNorm scale (FastNet keeps it at 1 and trains only the shift)
    dirac_init: bool = True  # initialise the first c_in filters of every 3x3 conv as the identity

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1 or self.whiten_patch < 1:
            raise UserError("model.widths needs at least one positive width and model.whiten_patch must be >= 1")

    def fastnet(self) -> FastNetConfig:
        """The FastNet config of these encoder options (what `ConvGroup` reads)."""
        return FastNetConfig(
            widths=list(self.widths),
            whiten_patch=self.whiten_patch,
            whiten_eps=self.whiten_eps,
            bn_momentum=self.bn_momentum,
            bn_eps=self.bn_eps,
            bn_weight=self.bn_weight,
            dirac_init=self.dirac_init,
        )


@dataclass
class SimCLRConfig(EncoderConfig):
    name: str = "simclr"
    proj_hidden: int = 512  # hidden width of the projection MLP (SimCLR: the encoder's width; 2048 for a ResNet-50)
    proj_dim: int = 128  # output width of the projection MLP, where NT-Xent compares views (SimCLR: 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_hidden < 1 or self.proj_dim < 1:
            raise UserError("model.proj_hidden and model.proj_dim must be >= 1")


@dataclass
class ProbeConfig(EncoderConfig):
    name: str = "simclr-probe"
    norm: bool = True  # standardise the features by a BatchNorm1d without affine parameters before the head
    #                    (MAE's linear probe, He et al. 2022): still a linear classifier, but far easier to fit


class Encoder(nn.Module):
    """FastNet's feature extractor: (B, C, H, W) normalised images -> (B, c) features, under FastNet's names."""

    def __init__(self, cfg: EncoderConfig, spec: ImageSpec):
        super().__init__()
        c_in, h, w = spec.input_shape
        if (min(h, w) - cfg.whiten_patch + 1) // 2 ** len(cfg.widths) < 1:
            raise UserError(
                f"model.widths has {len(cfg.widths)} groups, each halving the image, but the images are "
                f"only {h}x{w}: use fewer groups"
            )
        fast = cfg.fastnet()
        self.whiten = PatchWhiten(c_in, cfg.whiten_patch, cfg.whiten_eps)  # (B, C, H, W) -> (B, 2d, H-k+1, W-k+1)
        c, groups = 2 * self.whiten.dim, []
        for width in cfg.widths:
            groups.append(ConvGroup(c, width, fast))
            c = width
        self.groups = nn.Sequential(*groups)  # (B, 2d, H', W') -> (B, c, H'/2^n, W'/2^n)
        self.width = c

    def features(self, x: Tensor) -> Tensor:
        """The representation h: (B, C, H, W) -> (B, c), FastNet's forward up to its head."""
        x = F.gelu(self.whiten(x))
        return self.groups(x).amax(dim=(2, 3))  # global max-pool: (B, c)

    def init_from_data(self, batch) -> None:
        """FastNet's patch whitening from a batch of normalised training images `x` (the first 5,000)."""
        self.whiten.init_from_data(batch["x"])


class SimCLRNet(Encoder):
    """Encoder + projection MLP; `forward` gives the projections z that NT-Xent compares."""

    def __init__(self, cfg: SimCLRConfig, spec: ImageSpec):
        super().__init__(cfg, spec)
        self.projector = nn.Sequential(  # (B, c) -> (B, proj_dim); SimCLR's g(.) with a BN (SimCLR v2)
            nn.Linear(self.width, cfg.proj_hidden, bias=False),
            nn.BatchNorm1d(cfg.proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden, cfg.proj_dim),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, proj_dim)
        return self.projector(self.features(x))


class LinearProbe(Encoder):
    """A linear classifier on a frozen encoder: the encoder's parameters never get gradients (so the optimizer
    never sees them) and its BatchNorm layers stay in eval mode (running statistics of the pretraining) whatever
    `train()` says; only the head (and its feature standardisation) learns."""

    def __init__(self, cfg: ProbeConfig, spec: ImageSpec):
        super().__init__(cfg, spec)
        for p in self.parameters():
            p.requires_grad_(False)
        self.norm = nn.BatchNorm1d(self.width, affine=False) if cfg.norm else nn.Identity()
        self.head = nn.Linear(self.width, spec.num_classes)
        self.train()  # a module starts in training mode without a call to train(): freeze the BN from the start

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.whiten.eval()
        self.groups.eval()  # frozen BN: no running-statistics updates, the pretraining's statistics used
        return self

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        with torch.no_grad():  # nothing below the head learns: keep no activations for a backward pass
            h = self.features(x)
        return self.head(self.norm(h))


@models.register("simclr", config=SimCLRConfig, example=CIFAR)
def simclr(cfg: SimCLRConfig, spec: ImageSpec) -> nn.Module:
    """SimCLR pretraining net: FastNet encoder (FastNet's tensor names) + projection MLP; outputs projections."""
    return SimCLRNet(cfg, spec)


@models.register("simclr-probe", config=ProbeConfig, example=CIFAR)
def simclr_probe(cfg: ProbeConfig, spec: ImageSpec) -> nn.Module:
    """Linear probe: a linear head on a frozen FastNet encoder (load one with init.from=RUN)."""
    return LinearProbe(cfg, spec)
