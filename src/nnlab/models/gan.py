"""DCGAN (Radford et al. 2016, "Unsupervised representation learning with deep convolutional generative
adversarial networks"): a generator of transposed convolutions with BatchNorm and ReLU, a discriminator of strided
convolutions with LeakyReLU(0.2), weights drawn from N(0, 0.02). Sized for small images: two upsampling stages, so
28x28 (MNIST: 7 -> 14 -> 28) and 8x8 (digits: 2 -> 4 -> 8).

The critic of WGAN-GP (Gulrajani et al. 2017) must not use BatchNorm: its gradient penalty is a per-example
gradient, which batch statistics would mix; `d_norm: layer` (a LayerNorm over channels and pixels, as the paper
suggests) or `none` instead. The task (tasks/gan.py) refuses the combination.

`GAN` holds both players as the sub-modules `generator` and `discriminator` (each gets its own optimizer from the
task) and answers the `Generative` protocol: `latent_dim`, `decode(z)` and `sample(n)`, images in [0, 1].
`forward(x)` is the discriminator's score of images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.image import ImageSpec
from ..errors import UserError
from . import models

STAGES = 2  # upsampling stages of the generator (and strided convolutions of the discriminator): H = 4 * h0
MNIST = ImageSpec(input_shape=(1, 28, 28), num_classes=10, classes=[str(i) for i in range(10)])


@dataclass
class GANConfig:
    name: str = "dcgan"
    latent_dim: int = 100  # size of the noise vector z ~ N(0, I) the generator maps to an image
    g_width: int = 64  # channels of the generator's last hidden layer (2x that before it)
    d_width: int = 64  # channels of the discriminator's first convolution (2x that in the second)
    d_norm: str = "batch"  # normalisation in the discriminator: batch (DCGAN) | layer | none (WGAN-GP: not batch)

    def __post_init__(self) -> None:
        for key in ("latent_dim", "g_width", "d_width"):
            if getattr(self, key) < 1:
                raise UserError(f"bad value for config key 'model.{key}': must be >= 1, got {getattr(self, key)}")
        if self.d_norm not in ("batch", "layer", "none"):
            raise UserError(f"bad value for config key 'model.d_norm': must be batch, layer or none, got "
                            f"'{self.d_norm}'")


def dcgan_init(m: nn.Module) -> None:
    """Radford et al.: every convolution and linear weight from N(0, 0.02), BatchNorm scales from N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (B, latent) -> images (B, C, H, W) in [-1, 1] (tanh)."""

    def __init__(self, cfg: GANConfig, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        self.h0, self.w0, self.ch = h // 2**STAGES, w // 2**STAGES, 2 * cfg.g_width
        self.project = nn.Sequential(  # (B, latent) -> (B, 2w * h0 * w0)
            nn.Linear(cfg.latent_dim, self.ch * self.h0 * self.w0, bias=False),
            nn.BatchNorm1d(self.ch * self.h0 * self.w0), nn.ReLU(inplace=True))
        self.up = nn.Sequential(  # (B, 2w, h0, w0) -> (B, w, 2h0, 2w0) -> (B, C, H, W)
            nn.ConvTranspose2d(self.ch, cfg.g_width, 4, 2, 1, bias=False), nn.BatchNorm2d(cfg.g_width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(cfg.g_width, c, 4, 2, 1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.up(self.project(z).view(-1, self.ch, self.h0, self.w0))


def d_norm(kind: str, c: int) -> list[nn.Module]:
    if kind == "batch":
        return [nn.BatchNorm2d(c)]
    if kind == "layer":  # LayerNorm over (C, H, W) with a per-channel scale and shift
        return [nn.GroupNorm(1, c)]
    return []


class Discriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> one score per image (B, 1): a logit (gan loss) or a critic value."""

    def __init__(self, cfg: GANConfig, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        k = cfg.d_width
        self.features = nn.Sequential(  # (B, C, H, W) -> (B, k, H/2, W/2) -> (B, 2k, H/4, W/4); no norm first
            nn.Conv2d(c, k, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(k, 2 * k, 4, 2, 1, bias=cfg.d_norm == "none"), *d_norm(cfg.d_norm, 2 * k),
            nn.LeakyReLU(0.2, inplace=True), nn.Flatten())
        self.score = nn.Linear(2 * k * (h // 4) * (w // 4), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(self.features(x))


class GAN(nn.Module):
    """Both players; the task calls `generator` and `discriminator` directly."""

    def __init__(self, cfg: GANConfig, shape: tuple[int, int, int]):
        super().__init__()
        self.latent_dim, self.d_norm = cfg.latent_dim, cfg.d_norm
        self.generator = Generator(cfg, shape)
        self.discriminator = Discriminator(cfg, shape)
        self.apply(dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        """The discriminator's score (B, 1) of images x (B, C, H, W) in [-1, 1]."""
        return self.discriminator(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] from latent vectors z (B, latent_dim)."""
        return self.generator(z.to(next(self.parameters()).device)).float().add(1).div(2).clamp(0, 1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, C, H, W) in [0, 1] from z ~ N(0, I), drawn with `generator` on its device."""
        device = generator.device if generator is not None else next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, generator=generator, device=device))


@models.register("dcgan", config=GANConfig, example=MNIST)
def dcgan(cfg: GANConfig, spec) -> nn.Module:
    """DCGAN generator and discriminator for small images (H, W divisible by 4: MNIST 28x28, digits 8x8)."""
    c, h, w = spec.input_shape
    if h % 2**STAGES or w % 2**STAGES:
        raise UserError(f"model dcgan upsamples {STAGES} times by 2, so the image sides must be divisible by "
                        f"{2**STAGES}; the data's images are {h}x{w}")
    return GAN(cfg, (c, h, w))
