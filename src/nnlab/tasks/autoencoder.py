"""The autoencoder tasks: `ae` (reconstruction error) and `vae` (the negative ELBO with KL warm-up and beta, on
dynamically binarised images; in evaluation the ELBO, its terms, the active units and the importance-weighted NLL).
Both write grids into plots/ at every evaluation (reconstructions, prior samples) and show them in the report;
`predict` scores image files. The shared plumbing and the commands are in tasks/generative.py; the metrics are
defined in docs/generative.md.

Model inputs: the loader's normalised images (as a classifier gets them, so an encoder transfers by `init.from`);
the `vae` task binarises the pixels first, then normalises them again. Targets are pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import run as R
from ..config import check
from ..data import Batch
from ..data.image import ImageSpec
from ..errors import UserError
from ..models.autoencoder import VAEOutput, iw_log_likelihood, kl_to_prior, log_likelihood
from ..report import plot_curves
from . import TaskBase, tasks
from .generative import MAX_PAIRS, MAX_SAMPLES, from_unit, pairs_grid, save_grid, to_unit, view_scale

# --- evaluation binarisation ----------------------------------------------------------------------------------
HASH_P = 2_147_483_647  # 2^31 - 1, a prime: every product below stays under 2^63
HASH_SEED = 20160901  # seed of the per-pixel constants of the fixed binarisation (changing it changes every score)
_HASH: dict[tuple[str, int], Tensor] = {}  # (device, pixels per image) -> the per-pixel constants


def fixed_binarize(x01: Tensor) -> tuple[Tensor, Tensor]:
    """Pixels in [0, 1] (B, C, H, W) -> a fixed Bernoulli draw of each in {0, 1}, and an integer key per image.
    Each pixel's uniform number is a hash of the image's content and the pixel's position, so an image is
    binarised the same way whatever the batch, its position in it, the process or a resume: val and test scores
    are comparable across runs and exact under resume, as a seeded binarisation of the split drawn once would be,
    without holding one."""
    b = len(x01)
    flat = x01.reshape(b, -1)  # (B, D)
    key = (str(flat.device), flat.shape[1])
    if key not in _HASH:
        g = torch.Generator().manual_seed(HASH_SEED)
        _HASH[key] = torch.randint(1, HASH_P, (4, flat.shape[1]), generator=g).to(flat.device)  # (4, D)
    m, a, c, d = _HASH[key]
    levels = (flat * 255).round().long() + 1  # (B, D) in 1..256
    ids = (levels * m).sum(1) % HASH_P  # (B,) the image's key
    h = (ids[:, None] * a + c) % HASH_P  # (B, D)
    h = (h * h + d) % HASH_P  # a nonlinear second round
    u = (h.double() + 0.5) / HASH_P  # (B, D) uniform in (0, 1)
    return (u < flat.double()).to(x01.dtype).view_as(x01), ids


def _generator(ids: Tensor) -> torch.Generator:
    """A generator seeded by a batch's image keys: the evaluation's draws of z are fixed for the same images."""
    return torch.Generator(device=ids.device).manual_seed(int(ids.sum()) % 2**62)


# --- the autoencoder task -------------------------------------------------------------------------------------
HIGHER = ("elbo", "active")  # the metrics where higher is better (loss, rec, kl, nll, mse, bce: lower)


@dataclass
class AEConfig:
    name: str = "ae"
    loss: str = "bce"  # reconstruction loss per image: bce (pixels as Bernoulli means, in nats) | mse (squared error)
    noise: float = 0.0  # denoising autoencoder (Vincent et al. 2008): std of Gaussian noise on training pixels
    grid: int = 32  # val images in the reconstruction grid written at every evaluation (0: none)

    def __post_init__(self) -> None:
        check(self.loss in ("bce", "mse"), "task.loss", "must be bce or mse")
        check(self.noise >= 0, "task.noise", "must be >= 0")
        check(0 <= self.grid <= MAX_PAIRS, "task.grid", f"must be in 0..{MAX_PAIRS}")


class ImageTask(TaskBase):
    """What the ae and vae tasks share: inputs, direction of metrics, grids over time, predict."""

    monitor = "loss"
    grids = "samples"  # file prefix of the grids written at every evaluation (plots/<grids>-<step>.png)

    def __init__(self, cfg: Any, spec: Any):
        if not isinstance(spec, ImageSpec):
            raise UserError(f"task '{cfg.name}' models images; the data's spec is of kind '{spec.kind}'")
        self.cfg, self.spec = cfg, spec

    def higher_is_better(self, metric: str) -> bool:
        return metric in HIGHER

    def inputs(self, x: Tensor, train: bool = False) -> tuple[Tensor, Tensor]:
        """The model's input and the images it is scored on (pixels in [0, 1]) from a loader's batch `x`."""
        raise NotImplementedError

    def first_images(self, data: Any, n: int, device: torch.device) -> Tensor:
        split = "val" if "val" in data.splits else "test"
        return next(iter(data.loader(split, n, device=device).epoch(0)))["x"][:n]

    @torch.no_grad()
    def reconstructions(self, model: nn.Module, data: Any, n: int, path: Path) -> None:
        x_in, target = self.inputs(self.first_images(data, n, next(model.parameters()).device))
        images, cols = pairs_grid(target, model.reconstruct(x_in))
        save_grid(path, images, cols, view_scale(images.shape[-2]))

    def grid_lines(self, folder: Path, title: str) -> list[str]:
        """Report lines showing up to 6 of the grids written during training, evenly spread, the last included."""
        files = sorted((folder / R.PLOTS).glob(f"{self.grids}-*.png"))
        if not files:
            return []
        pick = sorted({round(i * (len(files) - 1) / 5) for i in range(6)}) if len(files) > 6 else range(len(files))
        lines = ["", f"### {title} over training ({len(files)} evaluations)", ""]
        for i in pick:
            step = int(files[i].stem.split("-")[-1])
            lines.append(f"step {step}: ![{self.grids} at step {step}]({R.PLOTS}/{files[i].name})  ")
        return lines

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        """Per image file: its scores (the task's metrics of that one image), or {"error": message}."""
        batch, errors = self.spec.encode(inputs)
        rows: list[dict[str, Any]] = [{"error": e} if e else {} for e in errors]
        if batch is not None:
            device = next(model.parameters()).device
            with torch.no_grad():
                scores = self.scores(model.eval(), batch.to(device)["x"])
            good = [r for r in rows if "error" not in r]
            for i, row in enumerate(good):
                row |= {k: float(v[i]) for k, v in scores.items() if v.ndim == 1}
        return rows

    def scores(self, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """The metrics of each image of a loader's batch `x`: (B,) tensors (and others that predict leaves out)."""
        raise NotImplementedError


class Autoencoder(ImageTask):
    """Reconstruction: the model maps the (normalised) image to pixels in [0, 1] through its code."""

    grids = "reconstructions"

    def inputs(self, x: Tensor, train: bool = False) -> tuple[Tensor, Tensor]:
        target = to_unit(x, self.spec)
        if train and self.cfg.noise:
            x = from_unit(target + self.cfg.noise * torch.randn_like(target), self.spec)
        return x, target

    def losses(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per image (B,): binary cross-entropy in nats and squared error, summed over its pixels."""
        if not isinstance(logits, Tensor) or logits.shape != target.shape:
            got = f"a tensor {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
            raise UserError(f"task 'ae' trains a model that returns an image per image (ae-mlp, ae-conv); this model "
                            f"returns {got} for images {tuple(target.shape)}")
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
        return {"bce": bce, "sse": (logits.sigmoid() - target).square().flatten(1).sum(1)}

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x_in, target = self.inputs(batch["x"], train=True)
        per = self.losses(model(x_in), target)
        return {"loss": per[self.cfg.loss if self.cfg.loss == "bce" else "sse"].mean(),
                "mse": per["sse"].mean() / target[0].numel()}

    def scores(self, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        x_in, target = self.inputs(x)
        per = self.losses(model(x_in), target)
        return {"loss": per["bce"] if self.cfg.loss == "bce" else per["sse"], "bce": per["bce"],
                "mse": per["sse"] / target[0].numel()}

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        s = self.scores(model, batch["x"])
        return {f"{k}_sum": v.double().sum() for k, v in s.items()} | {"n": torch.tensor(len(batch["x"]))}

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        n = max(int(stats["n"]), 1)
        return {k[:-4]: v.item() / n for k, v in stats.items() if k.endswith("_sum")}

    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        if self.cfg.grid and data is not None:
            self.reconstructions(model, data, self.cfg.grid, folder / R.PLOTS / f"{self.grids}-{step:06d}.png")

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        final = summary.get("final", {})
        lines = ["", "## Autoencoder", "", f"- loss: {self.cfg.loss} per image (summed over its pixels); "
                 "mse: mean squared error per pixel in [0, 1]; bce: binary cross-entropy per image, nats"]
        for split in ("val", "test"):
            if f"{split}/loss" in final:
                lines.append(f"- {split}: loss {final[f'{split}/loss']:.3f}, mse {final[f'{split}/mse']:.5f}, "
                             f"bce {final[f'{split}/bce']:.2f} nats/image")
        if summary.get("samples_per_s"):
            lines.append(f"- training: {summary['samples_per_s']:,.0f} images/s")
        lines += self.grid_lines(folder, "Val images (odd rows) over their reconstructions (even rows)")
        if model is not None and data is not None:
            self.reconstructions(model, data, 32, folder / R.PLOTS / "reconstruct.png")
            lines += ["", "### Final reconstructions (best checkpoint)", "", f"![reconstructions]({R.PLOTS}/"
                      "reconstruct.png)"]
        return lines


@tasks.register("ae", config=AEConfig)
def ae(cfg: AEConfig, spec: Any) -> Autoencoder:
    """Autoencoder: reconstruction error (binary cross-entropy or squared error per image)."""
    return Autoencoder(cfg, spec)


# --- the VAE task ---------------------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    name: str = "vae"
    binarize: bool = True  # pixels ~ Bernoulli(value): drawn afresh for every training batch (dynamic binarisation),
    #                        fixed per image in evaluation (see fixed_binarize); false: grey pixels as they are
    beta: float = 1.0  # weight of the KL term in training (beta-VAE, Higgins et al. 2017; 1: the ELBO itself)
    kl_warmup: int = 0  # training steps (micro-batches under train.accumulate) over which the KL weight rises
    #                     linearly from 0 to beta (Bowman et al. 2016; Sonderby et al. 2016); 0: beta from the start
    iw_samples: int = 100  # k of the importance-weighted NLL in the final evaluation, eval and predict (0: skip)
    iw_eval: int = 0  # k of the importance-weighted NLL in evaluations during training (0: skip it there)
    grid: int = 64  # prior samples in the grid written at every evaluation, the same z each time (0: none)

    def __post_init__(self) -> None:
        check(self.beta >= 0, "task.beta", "must be >= 0")
        for key in ("kl_warmup", "iw_samples", "iw_eval"):
            check(getattr(self, key) >= 0, f"task.{key}", "must be >= 0")
        check(0 <= self.grid <= MAX_SAMPLES, "task.grid", f"must be in 0..{MAX_SAMPLES}")


class VariationalAutoencoder(ImageTask):
    """The negative ELBO (beta-weighted KL, with warm-up) as the training loss; in evaluation the ELBO itself,
    its two terms, the active units and the importance-weighted NLL (docs/generative.md)."""

    def inputs(self, x: Tensor, train: bool = False) -> tuple[Tensor, Tensor]:
        target = to_unit(x, self.spec)
        if self.cfg.binarize:
            target = torch.bernoulli(target) if train else fixed_binarize(target)[0]
        return from_unit(target, self.spec), target

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x_in, target = self.inputs(batch["x"], train=True)
        out = model(x_in)
        if not isinstance(out, VAEOutput):
            raise UserError(f"task 'vae' trains a variational autoencoder (vae-mlp, vae-conv); this model returns "
                            f"{type(out).__name__}, not a VAEOutput")
        rec = -log_likelihood(out.params, target)  # (B,) nats
        kl = kl_to_prior(out.mu, out.logvar)  # (B,)
        c = self.cfg
        weight = c.beta * (min(1.0, (int(out.updates) + 1) / c.kl_warmup) if c.kl_warmup else 1.0)
        return {"loss": (rec + weight * kl).mean(), "rec": rec.mean().detach(), "kl": kl.mean().detach(),
                "elbo": -(rec + kl).mean().detach(), "kl_weight": torch.tensor(weight)}

    def scores(self, model: nn.Module, x: Tensor, k: int | None = None) -> dict[str, Tensor]:
        """Per image (B,): -ELBO (`loss`), its terms (one z ~ q per image), the posterior mean (B, Z) for the active
        units, and the IW NLL with k samples (default task.iw_samples; 0: none). Draws are fixed per image."""
        target = to_unit(x, self.spec)
        target, ids = fixed_binarize(target) if self.cfg.binarize else (target, fixed_binarize(target)[1])
        x_in = from_unit(target, self.spec)
        gen = _generator(ids)
        mu, logvar = model.posterior(x_in)
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen, device=mu.device)
        rec = -model.log_px(z, target)
        kl = kl_to_prior(mu, logvar)
        out = {"loss": rec + kl, "elbo": -(rec + kl), "rec": rec, "kl": kl}
        k = self.cfg.iw_samples if k is None else k
        if k:
            out["nll"] = -iw_log_likelihood(model, x_in, target, k, gen)
        return out | {"mu": mu}

    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        s = self.scores(model, batch["x"], self.cfg.iw_samples if final else self.cfg.iw_eval)
        mu = s.pop("mu").double()
        return ({f"{k}_sum": v.double().sum() for k, v in s.items()}
                | {"n": torch.tensor(len(mu)), "mu_sum": mu.sum(0), "mu_sq": mu.square().sum(0)})

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        n = max(int(stats["n"]), 1)
        out = {k[:-4]: v.item() / n for k, v in stats.items() if k.endswith("_sum") and k != "mu_sum"}
        var = stats["mu_sq"] / n - (stats["mu_sum"] / n).square()  # Cov_x(E_q[z]) per latent unit
        return out | {"active": float((var > 0.01).sum())}  # active units (Burda et al. 2016, section 5.2)

    @torch.no_grad()
    def samples(self, model: nn.Module, path: Path) -> None:
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)  # the same z at every step
        images = model.sample(self.cfg.grid, gen)
        save_grid(path, images, None, view_scale(images.shape[-2]))

    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        if self.cfg.grid:
            self.samples(model, folder / R.PLOTS / f"{self.grids}-{step:06d}.png")

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        final = summary.get("final", {})
        c = self.cfg
        lines = ["", "## Variational autoencoder", "",
                 f"- data: {'dynamically binarised (fixed per image in evaluation)' if c.binarize else 'as is'}; "
                 f"beta {c.beta}, KL warm-up {c.kl_warmup} steps",
                 "- loss = -ELBO = rec + kl, nats per image; nll: importance-weighted estimate of -log p(x) with "
                 f"k = {c.iw_samples} (Burda et al. 2016); active: latent units with Cov_x(E_q[z]) > 0.01"]
        for split in ("val", "test"):
            if f"{split}/loss" in final:
                nll = f", IW NLL {final[f'{split}/nll']:.2f}" if f"{split}/nll" in final else ""
                lines.append(f"- {split}: -ELBO {final[f'{split}/loss']:.2f} nats (rec {final[f'{split}/rec']:.2f}, "
                             f"KL {final[f'{split}/kl']:.2f}){nll}; {final[f'{split}/active']:.0f} active units")
        if summary.get("samples_per_s"):
            lines.append(f"- training: {summary['samples_per_s']:,.0f} images/s")
        if plot_curves(R.read_metrics(folder), ["rec", "kl"], folder / R.PLOTS / "elbo_terms.png"):
            lines += ["", "### The ELBO's terms", "", f"![rec and kl]({R.PLOTS}/elbo_terms.png)"]
        lines += self.grid_lines(folder, "Prior samples (the same z each time)")
        if model is not None and data is not None:
            self.reconstructions(model, data, 32, folder / R.PLOTS / "reconstruct.png")
            lines += ["", "### Reconstructions (best checkpoint): inputs as the model sees them over the decoder's "
                      "mean", "", f"![reconstructions]({R.PLOTS}/reconstruct.png)"]
        return lines


@tasks.register("vae", config=VAEConfig)
def vae(cfg: VAEConfig, spec: Any) -> VariationalAutoencoder:
    """Variational autoencoder: negative ELBO with KL warm-up and beta, importance-weighted NLL, sample grids."""
    return VariationalAutoencoder(cfg, spec)
