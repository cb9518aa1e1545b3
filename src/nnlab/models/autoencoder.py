"""Autoencoders and variational autoencoders over images, MLP and convolutional: `ae-mlp`, `ae-conv`, `vae-mlp`,
`vae-conv`, and the importance-weighted estimate of a VAE's log-likelihood.

Each encoder IS a classifier of this package with the code as its output: the MLP encoder is `mlp.MLP` (`body`,
`head`), the convolutional one `cnn.CNN` (`features`, `head`), so `init.from` copies an autoencoder's encoder into
a classifier of the same widths (only the last layer, the code's, is new there). The decoders mirror them.

A VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") has a Gaussian posterior q(z|x) = N(mu, diag
sigma^2) from the encoder, the prior p(z) = N(0, I), and a decoder p(x|z) that is Bernoulli (logits per pixel: for
binarised images) or Gaussian (a mean in [0, 1] and a log-variance per pixel, Kingma & Welling's appendix C.2). The
decoder's output says which: (N, C, H, W) Bernoulli logits, or (N, 2C, H, W) Gaussian means (before the sigmoid)
and log-variances; `log_likelihood` reads it so. Inputs are whatever the task feeds (tasks/generative.py:
normalised images); `decode`, `sample` and `reconstruct` return pixels in [0, 1] (the decoder's mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from . import MNIST, models
from .cnn import CNN, CNNConfig, conv_bn
from .mlp import MLP, MLPConfig

LIKELIHOODS = ("bernoulli", "gaussian")
LOGVAR_MIN = math.log(1e-4)  # the Gaussian decoder's floor: sigma >= 0.01 of the [0, 1] pixel range (a density
#                              on pixels that never vary, as MNIST's borders, would otherwise grow without bound)
LOG_2PI = math.log(2 * math.pi)


@dataclass
class MLPAEConfig:
    name: str = "ae-mlp"
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # encoder widths (as mlp's); the decoder mirrors
    latent: int = 32  # numbers in the code z
    dropout: float = 0.0  # dropout after each hidden activation of the encoder and the decoder


@dataclass
class MLPVAEConfig(MLPAEConfig):
    name: str = "vae-mlp"
    likelihood: str = "bernoulli"  # decoder p(x|z): bernoulli (logits; binarised images) | gaussian


@dataclass
class ConvAEConfig:
    name: str = "ae-conv"
    channels: list[int] = field(default_factory=lambda: [32, 64])  # conv width of each stage (as cnn's)
    convs_per_stage: int = 2  # 3x3 convolutions in each stage, in the encoder and in the decoder
    hidden: int = 256  # width of the fully connected layer between the last stage and the code
    latent: int = 32  # numbers in the code z
    dropout: float = 0.0  # dropout in the encoder's head (as cnn's)
    batch_norm: bool = True  # BatchNorm after each convolution


@dataclass
class ConvVAEConfig(ConvAEConfig):
    name: str = "vae-conv"
    likelihood: str = "bernoulli"  # decoder p(x|z): bernoulli (logits; binarised images) | gaussian


class VAEOutput(NamedTuple):
    params: Tensor  # (B, C, H, W) Bernoulli logits or (B, 2C, H, W) Gaussian means and log-variances
    mu: Tensor  # (B, Z) posterior mean
    logvar: Tensor  # (B, Z) posterior log-variance
    updates: Tensor  # () training forward passes before this one (the task's KL warm-up clock)


def log_likelihood(params: Tensor, target: Tensor) -> Tensor:
    """log p(x|z) (N,) in nats of images `target` (N, C, H, W) in [0, 1] under the decoder's `params`: Bernoulli
    logits (N, C, H, W), or Gaussian (N, 2C, H, W) means before the sigmoid and log-variances."""
    params, target = params.float(), target.float()
    if params.shape[1] == target.shape[1]:
        return -F.binary_cross_entropy_with_logits(params, target, reduction="none").flatten(1).sum(1)
    mean, logvar = params.chunk(2, dim=1)
    logvar = logvar.clamp(min=LOGVAR_MIN)
    return -0.5 * (LOG_2PI + logvar + (target - mean.sigmoid()).square() / logvar.exp()).flatten(1).sum(1)


def mean_image(params: Tensor, channels: int) -> Tensor:
    """The decoder's mean, pixels in [0, 1] (N, C, H, W), from its `params` (see `log_likelihood`)."""
    return params[:, :channels].float().sigmoid()


def kl_to_prior(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) (B,), in closed form (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).float().sum(1)


class LatentModel(Protocol):
    """What the importance-weighted estimate needs of a latent-variable model with prior N(0, I)."""

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (B, Z) of the Gaussian q(z|x)."""

    def log_px(self, z: Tensor, target: Tensor) -> Tensor:
        """log p(target|z) (N,) for z (N, Z) and targets (N, ...)."""


class Coder(nn.Module):
    """What every autoencoder here shares; a subclass builds the encoder (`encoder_out(x)` -> (B, Z), or (B, 2Z)
    for a VAE: mean and log-variance) and `decoder` (z (B, Z) -> (B, k C, H, W))."""

    latent_dim: int
    variational: bool
    decoder: nn.Module

    def setup(self, in_shape: tuple[int, ...], latent: int, variational: bool) -> None:
        self.in_shape, self.latent_dim, self.variational = tuple(in_shape), latent, variational
        if variational:  # a buffer: saved with the weights, so a resumed run goes on with the warm-up where it was
            self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def encoder_out(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and log-variance (B, Z) each of q(z|x); an AE's code with log-variance -inf."""
        h = self.encoder_out(x).float()
        if not self.variational:
            return h, torch.full_like(h, -math.inf)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # exp stays finite under a bad step

    def log_px(self, z: Tensor, target: Tensor) -> Tensor:
        """log p(target|z) (N,) in nats, for codes z (N, Z) and images (N, C, H, W) in [0, 1]."""
        return log_likelihood(self.decoder(z), target)

    def forward(self, x: Tensor) -> Tensor | VAEOutput:
        """An AE: reconstruction logits (B, C, H, W). A VAE: `VAEOutput` of one z ~ q(z|x) (reparameterised)."""
        if not self.variational:
            return self.decoder(self.encoder_out(x))
        mu, logvar = self.posterior(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # (B, Z)
        updates = self.updates.clone()
        if self.training:
            self.updates += 1
        return VAEOutput(self.decoder(z), mu, logvar, updates)

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]  # (B, Z): the code, or the posterior mean

    def decode(self, z: Tensor) -> Tensor:
        return mean_image(self.decoder(z), self.in_shape[0])  # (N, C, H, W) in [0, 1]

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class Prior:
    """A VAE's prior p(z) = N(0, I): what makes it `Generative` (an autoencoder has none)."""

    def sample(self: Coder, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The decoder's mean (n, C, H, W) in [0, 1] at n draws from the prior."""
        device = next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, generator=generator, device=device))


@torch.no_grad()
def iw_log_likelihood(model: LatentModel, x: Tensor, target: Tensor, k: int, generator: torch.Generator | None = None,
                      chunk: int = 2**23) -> Tensor:
    """The importance-weighted estimate of log p(x) (B,), in nats (Burda et al. 2016, "Importance Weighted
    Autoencoders", eq. 8): L_k = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_1..z_k ~ q(z|x), a lower bound on log p(x)
    that rises with k towards it (L_1 is the ELBO in expectation). `x` is the model's input, `target` (B, ...) what
    is scored. The k samples go through the decoder in chunks of at most `chunk` output numbers, summed with a
    running log-sum-exp, so k = 5000 needs no more memory than k = 10."""
    mu, logvar = model.posterior(x)  # (B, Z)
    std = (0.5 * logvar).exp()
    b, zdim = mu.shape
    per = max(1, chunk // max(1, b * target[0].numel()))
    total = torch.full((b,), -math.inf, dtype=torch.float64, device=mu.device)
    done = 0
    while done < k:
        c = min(per, k - done)
        eps = torch.randn(c, b, zdim, generator=generator, device=mu.device)  # (c, B, Z)
        z = mu + std * eps
        log_pz = -0.5 * (z.square() + LOG_2PI).sum(-1)  # (c, B) prior N(0, I)
        log_qz = -0.5 * (eps.square() + LOG_2PI).sum(-1) - 0.5 * logvar.sum(-1)  # (c, B) posterior
        log_px = model.log_px(z.flatten(0, 1), target.expand(c, *target.shape).flatten(0, 1)).view(c, b)  # (c, B)
        total = torch.logaddexp(total, torch.logsumexp((log_px + log_pz - log_qz).double(), 0))
        done += c
    return total - math.log(k)


# --- MLP ------------------------------------------------------------------------------------------------------
class MLPAutoencoder(Coder, MLP):
    """Encoder: `mlp.MLP` (flatten -> [Linear -> GELU -> dropout] x N -> Linear to the code); decoder: the mirror
    image, ending in a Linear to k C H W numbers."""

    def __init__(self, cfg: MLPAEConfig, in_shape: tuple[int, ...], out_channels: int, variational: bool):
        c, h, w = in_shape
        MLP.__init__(self, MLPConfig(hidden=list(cfg.hidden), dropout=cfg.dropout),
                     c * h * w, cfg.latent * (2 if variational else 1))
        self.setup(in_shape, cfg.latent, variational)
        layers: list[nn.Module] = []
        width = cfg.latent
        for hdim in reversed(cfg.hidden):
            layers += [nn.Linear(width, hdim), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = hdim
        layers += [nn.Linear(width, out_channels * h * w), nn.Unflatten(1, (out_channels, h, w))]
        self.decoder = nn.Sequential(*layers)  # (N, Z) -> (N, k C, H, W)

    def encoder_out(self, x: Tensor) -> Tensor:
        return MLP.forward(self, x)  # (B, C, H, W) -> (B, Z or 2Z)


# --- convolutional --------------------------------------------------------------------------------------------
class ConvDecoder(nn.Module):
    """z -> Linear -> ReLU -> Linear -> (c, h, w) -> per stage, last first: nearest upsampling to the encoder
    stage's input size -> [conv3x3 -> BN -> ReLU] x n -> a 3x3 convolution to the output channels."""

    def __init__(self, cfg: ConvAEConfig, sizes: list[tuple[int, int]], out_channels: int):
        super().__init__()
        c = cfg.channels[-1]
        h, w = sizes[-1][0] // 2, sizes[-1][1] // 2  # the encoder's last feature map
        self.fc = nn.Sequential(nn.Linear(cfg.latent, cfg.hidden), nn.ReLU(inplace=True),
                                nn.Linear(cfg.hidden, c * h * w), nn.ReLU(inplace=True), nn.Unflatten(1, (c, h, w)))
        layers: list[nn.Module] = []
        for size, width in zip(reversed(sizes), reversed(cfg.channels), strict=True):
            layers.append(nn.Upsample(size=size, mode="nearest"))
            for _ in range(cfg.convs_per_stage):
                layers += conv_bn(c, width, cfg.batch_norm)
                c = width
        self.stages = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.stages(self.fc(z)))  # (N, Z) -> (N, k C, H, W)


class ConvAutoencoder(Coder, CNN):
    """Encoder: `cnn.CNN` (stages of [conv3x3 -> BN -> ReLU] x n -> max-pool, then Linear -> ReLU -> Linear to the
    code); decoder: `ConvDecoder`."""

    def __init__(self, cfg: ConvAEConfig, in_shape: tuple[int, ...], out_channels: int, variational: bool):
        CNN.__init__(self, CNNConfig(channels=list(cfg.channels), convs_per_stage=cfg.convs_per_stage,
                                     hidden=cfg.hidden, dropout=cfg.dropout, batch_norm=cfg.batch_norm),
                     in_shape, cfg.latent * (2 if variational else 1))
        self.setup(in_shape, cfg.latent, variational)
        sizes, (h, w) = [], in_shape[1:]
        for _ in cfg.channels:
            sizes.append((h, w))  # each stage's input size, which its decoder stage upsamples back to
            h, w = h // 2, w // 2
        self.decoder = ConvDecoder(cfg, sizes, out_channels)

    def encoder_out(self, x: Tensor) -> Tensor:
        return CNN.forward(self, x)  # (B, C, H, W) -> (B, Z or 2Z)


class MLPVAE(Prior, MLPAutoencoder):
    """`MLPAutoencoder` with a Gaussian posterior (the encoder outputs its mean and log-variance) and a prior."""


class ConvVAE(Prior, ConvAutoencoder):
    """`ConvAutoencoder` with a Gaussian posterior (the encoder outputs its mean and log-variance) and a prior."""


# --- the registered variants ----------------------------------------------------------------------------------
def _check(cfg: MLPAEConfig | ConvAEConfig, spec) -> int:
    """The decoder's output channels per image channel (1, or 2 for a Gaussian); refuses bad sizes."""
    if cfg.latent < 1:
        raise UserError(f"model.latent must be >= 1, got {cfg.latent}")
    if len(spec.input_shape) != 3:
        raise UserError(f"model '{cfg.name}' takes images (C, H, W); the data's inputs are {spec.input_shape}")
    if isinstance(cfg, ConvAEConfig) and min(spec.input_shape[1:]) < 2 ** len(cfg.channels):
        raise UserError(f"model.channels has {len(cfg.channels)} stages, each halving the image, but the images "
                        f"are only {spec.input_shape[1]}x{spec.input_shape[2]}: use fewer stages")
    likelihood = getattr(cfg, "likelihood", "bernoulli")
    if likelihood not in LIKELIHOODS:
        raise UserError(f"model.likelihood must be one of {', '.join(LIKELIHOODS)}, got '{likelihood}'")
    return 2 if likelihood == "gaussian" else 1


@models.register("ae-mlp", config=MLPAEConfig, example=MNIST)
def ae_mlp(cfg: MLPAEConfig, spec) -> nn.Module:
    """MLP autoencoder (its encoder is the mlp classifier's body)."""
    return MLPAutoencoder(cfg, spec.input_shape, spec.input_shape[0] * _check(cfg, spec), variational=False)


@models.register("ae-conv", config=ConvAEConfig, example=MNIST)
def ae_conv(cfg: ConvAEConfig, spec) -> nn.Module:
    """Convolutional autoencoder (its encoder is the cnn classifier)."""
    return ConvAutoencoder(cfg, spec.input_shape, spec.input_shape[0] * _check(cfg, spec), variational=False)


@models.register("vae-mlp", config=MLPVAEConfig, example=MNIST)
def vae_mlp(cfg: MLPVAEConfig, spec) -> nn.Module:
    """MLP variational autoencoder, Gaussian latent, Bernoulli or Gaussian decoder (Kingma & Welling 2014)."""
    return MLPVAE(cfg, spec.input_shape, spec.input_shape[0] * _check(cfg, spec), variational=True)


@models.register("vae-conv", config=ConvVAEConfig, example=MNIST)
def vae_conv(cfg: ConvVAEConfig, spec) -> nn.Module:
    """Convolutional variational autoencoder, Gaussian latent, Bernoulli or Gaussian decoder."""
    return ConvVAE(cfg, spec.input_shape, spec.input_shape[0] * _check(cfg, spec), variational=True)
