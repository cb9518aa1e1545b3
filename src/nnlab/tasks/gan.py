"""GANs: a task that takes over the update with two optimizers, one per player (the core's `optimizers`/`update`
path; docs/design.md). Each training step makes `n_critic` discriminator steps, each on its own part of the batch
with fresh fakes, then one generator step. Losses:

- `gan`: the non-saturating loss of Goodfellow et al. 2014, as DCGAN trains (Radford et al. 2016):
  D: softplus(-D(x)) + softplus(D(G(z))), G: softplus(-D(G(z))).
- `wgan-gp` (Gulrajani et al. 2017): critic D(G(z)) - D(x) + lambda (|grad D(x_hat)| - 1)^2 at random points x_hat
  between real and fake images (lambda 10); generator -D(G(z)). The paper's 5 critic steps per generator step,
  Adam lr 1e-4, betas (0, 0.9); the critic has no BatchNorm (refused: the penalty is per example).
- `hinge` (Lim & Ye 2017; Miyato et al. 2018): D: relu(1 - D(x)) + relu(1 + D(G(z))), G: -D(G(z)).

The `optim` section is not used: each player's Adam takes its learning rate and betas from this task's options;
`train.schedule`/`warmup`/`min_lr` still scale both learning rates and `train.grad_clip` clips each player.

Logged every step: loss_d, loss_g (and `loss`, their sum, which the loop watches for NaN), the discriminator's
accuracy on the real and the fake images (d_acc_real, d_acc_fake: near 1 for both, D is winning and G's gradients
vanish, the divergence sign), `diversity` (the mean pairwise squared distance between the step's generated images
over that between its real ones: -> 0 is mode collapse), and for wgan-gp the penalty `gp` and `wdist`, the critic's
estimate of the Wasserstein distance. Evaluated on a fixed set of `fid_samples` generated images (a seeded z, so
every evaluation, resumed or not, scores the same draws): the domain FID and the IS analogue against the split's
real images (tasks/fid.py, features of the classifier run `fid_classifier`), their feature diversity, the Fréchet
distance of raw pixels `fd_pixel` (always; the monitor when no classifier is given) and the discriminator's
accuracies. After each evaluation a grid of the first `grid` fixed draws goes to plots/samples-<step>.png.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import run as R
from ..config import check
from ..data import Batch
from ..data.image import ImageSpec
from ..errors import UserError, did_you_mean
from ..optim import Optimizers
from ..report import pyplot, save_figure
from . import TaskBase, tasks
from .fid import Classifier, add, fid_is, frechet_distance, image_stats, load_classifier, mean_cov, moments, quantise
from .generative import save_grid, to_unit, view_scale

LOSSES = ("gan", "wgan-gp", "hinge")
CHUNK = 500  # generated images per forward pass at evaluation


@dataclass
class GANTaskConfig:
    name: str = "gan"
    loss: str = "gan"  # gan (non-saturating, DCGAN) | wgan-gp (Gulrajani et al. 2017) | hinge
    lr_g: float = 2.0e-4  # the generator's Adam learning rate (the peak train.schedule scales)
    lr_d: float = 2.0e-4  # the discriminator's (critic's) Adam learning rate
    betas_g: list[float] = field(default_factory=lambda: [0.5, 0.999])  # the generator's Adam betas (DCGAN's)
    betas_d: list[float] = field(default_factory=lambda: [0.5, 0.999])  # the discriminator's Adam betas
    n_critic: int = 1  # discriminator steps per generator step, each on its 1/n_critic part of the batch
    gp_weight: float = 10.0  # lambda of WGAN-GP's gradient penalty
    fid_classifier: str = ""  # run (or checkpoint) folder of an image classifier for FID/IS features; "": none
    fid_samples: int = 5000  # generated images scored at every evaluation (a fixed, seeded set)
    sample_seed: int = 0  # seed of the fixed latent vectors (FID samples and sample grids)
    grid: int = 64  # images in the sample grid written after every evaluation (0: none)

    def __post_init__(self) -> None:
        check(self.loss in LOSSES, "task.loss", f"'{self.loss}' is not one of {', '.join(LOSSES)}"
              f"{did_you_mean(self.loss, LOSSES)}")
        for key in ("betas_g", "betas_d"):
            b = getattr(self, key)
            check(len(b) == 2 and all(0 <= v < 1 for v in b), f"task.{key}", "two numbers in [0, 1), e.g. [0.5, 0.9]")
        check(self.lr_g > 0 and self.lr_d > 0, "task.lr_g", "the learning rates lr_g and lr_d must be > 0")
        check(self.n_critic >= 1, "task.n_critic", "must be >= 1")
        check(self.gp_weight >= 0, "task.gp_weight", "must be >= 0")
        check(self.fid_samples >= 2, "task.fid_samples", "must be >= 2 (a covariance needs two images)")
        check(self.grid >= 0, "task.grid", "must be >= 0 (0: no sample grids)")


def spread(x: Tensor) -> Tensor:
    """Half the mean pairwise squared distance between the rows of x (B, ...): tr of their unbiased covariance."""
    x = x.detach().float().flatten(1)
    return (x - x.mean(0)).square().sum() / max(len(x) - 1, 1)


def shard() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Run `module`'s BatchNorm layers on batch statistics, as in training, without changing their running ones.
    A DCGAN discriminator only ever sees real-only and fake-only batches in training (Radford et al.), so its running
    statistics mix the two and its evaluation-mode scores say little; its accuracies are measured as it is trained."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (training, momentum, tracked) in zip(norms, saved, strict=True):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class GANTask(TaskBase):
    def __init__(self, cfg: GANTaskConfig, spec):
        if not isinstance(spec, ImageSpec):
            raise UserError(f"task gan generates images; the data is of kind '{spec.kind}'")
        self.cfg, self.spec = cfg, spec
        self.monitor = "fid" if cfg.fid_classifier else "fd_pixel"
        self.clf: Classifier | None = None
        self.fresh = True  # the next eval_stats call is an evaluation's first: it adds the generated set
        self.z: Tensor | None = None

    def higher_is_better(self, metric: str) -> bool:
        return metric not in ("fid", "fd_pixel", "wdist") and super().higher_is_better(metric)

    def classifier(self, device: torch.device) -> Classifier | None:
        if self.cfg.fid_classifier and self.clf is None:
            self.clf = load_classifier(self.cfg.fid_classifier, self.spec.input_shape, device)
        return self.clf

    def fixed_z(self, model: nn.Module) -> Tensor:
        """The fixed latent vectors (max(fid_samples, grid), latent_dim), drawn on the CPU (every device scores the
        same draws) and moved to the model's device."""
        device = next(model.parameters()).device
        if self.z is None or self.z.device != device or self.z.shape[1] != model.latent_dim:
            g = torch.Generator().manual_seed(self.cfg.sample_seed)
            n = max(self.cfg.fid_samples, self.cfg.grid)
            self.z = torch.randn(n, model.latent_dim, generator=g).to(device)
        return self.z

    # --- training ------------------------------------------------------------------------------------------
    def optimizers(self, model: nn.Module) -> Optimizers:
        """Adam for each player: [generator, discriminator]. Called once when training starts, so a bad FID
        classifier or an unsuitable critic fails here, before any step."""
        if not all(isinstance(getattr(model, k, None), nn.Module) for k in ("generator", "discriminator")):
            raise UserError(f"task gan trains a model with `generator` and `discriminator` sub-modules (model.name="
                            f"dcgan); {type(model).__name__} has none")
        if self.cfg.loss == "wgan-gp" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                              for m in model.discriminator.modules()):
            raise UserError("task.loss=wgan-gp penalises each image's gradient, which BatchNorm in the critic mixes "
                            "across the batch: set model.d_norm=layer (or none)")
        if self.classifier(next(model.parameters()).device) is None and os.environ.get("RANK", "0") == "0":
            print("note: task.fid_classifier is empty, so no FID or IS is computed and the best checkpoint follows "
                  "val/fd_pixel (raw pixels); train `nnlab train mnist-fid-classifier` and pass "
                  "task.fid_classifier=RUN for the domain FID", file=sys.stderr)
        c = self.cfg
        return Optimizers([torch.optim.Adam(model.generator.parameters(), lr=c.lr_g, betas=tuple(c.betas_g)),
                           torch.optim.Adam(model.discriminator.parameters(), lr=c.lr_d, betas=tuple(c.betas_d))])

    def threshold(self, s_real: Tensor, s_fake: Tensor) -> Tensor | float:
        """Where D's score separates real from fake: 0 for the gan and hinge losses; a critic's scores have no
        fixed origin (the WGAN loss is shift-invariant), so the midpoint of the two means."""
        return (s_real.mean() + s_fake.mean()) / 2 if self.cfg.loss == "wgan-gp" else 0.0

    def critic_loss(self, d: nn.Module, x: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """The discriminator's loss on real images x and generated ones (B, C, H, W) in [-1, 1], and its logs."""
        s_real, s_fake = d(x).float().squeeze(1), d(fake).float().squeeze(1)  # (B,) scores
        t = self.threshold(s_real.detach(), s_fake.detach())
        out = {"d_acc_real": (s_real > t).float().mean(), "d_acc_fake": (s_fake < t).float().mean()}
        if self.cfg.loss == "gan":
            out["loss_d"] = F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
        elif self.cfg.loss == "hinge":
            out["loss_d"] = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
        else:  # wgan-gp: the penalty at random points on the lines between real and fake images
            eps = torch.rand(len(x), 1, 1, 1, device=x.device)
            x_hat = (eps * x.float() + (1 - eps) * fake.float()).requires_grad_(True)
            (grad,) = torch.autograd.grad(d(x_hat).float().sum(), x_hat, create_graph=True)
            gp = (grad.flatten(1).float().norm(dim=1) - 1).square().mean()
            out |= {"loss_d": s_fake.mean() - s_real.mean() + self.cfg.gp_weight * gp, "gp": gp,
                    "wdist": s_real.mean() - s_fake.mean()}
        return out

    def update(self, model: nn.Module, batch: Batch, opt: Optimizers, stepper: Any) -> dict[str, Tensor]:
        g, d = model.generator, model.discriminator
        real = to_unit(batch["x"], self.spec) * 2 - 1  # (B, C, H, W) in [-1, 1], as the generator's tanh
        parts = real.chunk(self.cfg.n_critic)
        opt.zero_grad()
        logs: dict[str, Tensor] = {}
        for x in parts:  # the discriminator's steps, each on its own real images and fresh fakes
            with torch.no_grad():
                fake = g(torch.randn(len(x), model.latent_dim, device=x.device))
            out = self.critic_loss(d, x, fake)
            stepper.backward(out["loss_d"])
            stepper.step(1)
            add(logs, {k: v.detach() / len(parts) for k, v in out.items()})
        d.requires_grad_(False)  # the generator's step: no gradient into the discriminator's weights
        try:
            fake = g(torch.randn(len(parts[0]), model.latent_dim, device=real.device))  # (m, C, H, W)
            s = d(fake).float()
            loss_g = F.softplus(-s).mean() if self.cfg.loss == "gan" else -s.mean()
            stepper.backward(loss_g)
            stepper.step(0)
        finally:
            d.requires_grad_(True)
        logs |= {"loss_g": loss_g.detach(), "diversity": spread(fake) / spread(parts[-1]).clamp(min=1e-12)}
        return {"loss": logs["loss_d"] + logs["loss_g"], **logs}

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError("task gan makes its own update (two optimizers)")

    # --- evaluation ----------------------------------------------------------------------------------------
    def set_stats(self, prefix: str, images: Tensor, model: nn.Module) -> dict[str, Any]:
        """Additive statistics of images (B, C, H, W) in [0, 1]: pixel moments, the classifier's feature and
        class statistics, and D's scores (a list: per-example outputs)."""
        images = quantise(images)
        out: dict[str, Any] = moments(f"{prefix}_px", images.flatten(1))
        with batch_statistics(model.discriminator):
            out[f"{prefix}_d"] = model.discriminator(images * 2 - 1).float().squeeze(1).tolist()
        clf = self.classifier(images.device)
        return out | (image_stats(prefix, images, clf) if clf is not None else {})

    @torch.no_grad()
    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Any]:
        """The real images' statistics; an evaluation's first batch adds those of the fixed generated set, of which
        each of the `world` processes generates every world-th image (summed over them: the whole set, once)."""
        with torch.autocast(batch["x"].device.type, enabled=False):  # fp32: one scale for every run
            stats = self.set_stats("real", to_unit(batch["x"], self.spec), model)
            if self.fresh:
                self.fresh = False
                rank, world = shard()
                if world > self.cfg.fid_samples:
                    raise UserError(f"task.fid_samples={self.cfg.fid_samples} gives some of the {world} processes "
                                    f"nothing to generate: use at least {world}")
                for z in self.fixed_z(model)[rank:self.cfg.fid_samples:world].split(CHUNK):
                    add(stats, self.set_stats("fake", model.decode(z), model))  # (lists of scores concatenate)
        return stats

    def metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        self.fresh = True  # this evaluation is over
        if "fake_px_n" not in stats:
            raise RuntimeError("task gan: an evaluation without its generated set (eval_stats out of order)")
        mu_r, cov_r = mean_cov(stats, "real_px")
        mu_f, cov_f = mean_cov(stats, "fake_px")
        out = {"fd_pixel": frechet_distance(mu_r, cov_r, mu_f, cov_f),
               "diversity": float(cov_f.trace() / cov_r.trace().clamp(min=1e-12))}
        if "real_f_n" in stats:
            out |= fid_is(stats, "real", "fake")
        s_real, s_fake = torch.tensor(stats["real_d"]), torch.tensor(stats["fake_d"])
        t = self.threshold(s_real, s_fake)
        out |= {"d_acc_real": float((s_real > t).float().mean()), "d_acc_fake": float((s_fake < t).float().mean())}
        if self.cfg.loss == "wgan-gp":
            out["wdist"] = float(s_real.mean() - s_fake.mean())
        return out

    def describe(self, stats: dict[str, Any]) -> str:
        n_real, n_fake = int(stats["real_px_n"]), int(stats["fake_px_n"])
        clf = self.clf.source if self.clf is not None else "none (task.fid_classifier is empty: no FID/IS)"
        return (f"{n_fake} generated images (fixed z, seed {self.cfg.sample_seed}) against the split's {n_real} "
                f"real images; FID/IS features: {clf}")

    # --- outputs -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        """A grid of the first `grid` fixed draws into plots/samples-<step>.png."""
        if not self.cfg.grid:
            return
        device = next(model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            images = model.eval().decode(self.fixed_z(model)[:self.cfg.grid])
        save_grid(folder / R.PLOTS / f"samples-{step:06d}.png", images, scale=view_scale(images.shape[-2]))

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        raise UserError("a GAN run makes images rather than predicting anything from them: draw some with "
                        "`nnlab sample RUN --n 64 --out grid.png`")

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        c = self.cfg
        lines = ["", "## GAN", "", f"- loss `{c.loss}`, {c.n_critic} discriminator step(s) per generator step; "
                 f"Adam lr G {c.lr_g:g} / D {c.lr_d:g}, betas G {tuple(c.betas_g)} / D {tuple(c.betas_d)}"
                 + (f"; gradient penalty {c.gp_weight:g}" if c.loss == "wgan-gp" else ""),
                 f"- FID/IS features: {c.fid_classifier or 'none (task.fid_classifier is empty)'}; "
                 f"{c.fid_samples} generated images from a fixed z (seed {c.sample_seed}) against each split"]
        final = summary.get("final", {})
        for split in ("val", "test"):
            if f"{split}/fd_pixel" in final:
                got = [f"{k} {final[f'{split}/{k}']:.3f}" for k in ("fid", "is", "feature_diversity", "fd_pixel",
                                                                   "diversity") if f"{split}/{k}" in final]
                lines.append(f"- {split} (best checkpoint): {', '.join(got)}")
        if plot_players(R.read_metrics(folder), folder / R.PLOTS / "gan.png"):
            lines += ["", "### The two players", "", "![players](plots/gan.png)"]
        grids = sorted((folder / R.PLOTS).glob("samples-*.png"))
        if grids:
            shown = [grids[round(i * (len(grids) - 1) / 5)] for i in range(6)] if len(grids) > 6 else grids
            shown = list(dict.fromkeys(shown))
            lines += ["", f"### Samples over training (fixed z; {len(grids)} evaluations, plots/samples-*.png)", "",
                      "| " + " | ".join(f"step {int(p.stem.split('-')[1])}" for p in shown) + " |",
                      "|" + "---|" * len(shown),
                      "| " + " | ".join(f"![{p.stem}](plots/{p.name})" for p in shown) + " |"]
        return lines


def plot_players(rows: list[dict[str, Any]], path: Path) -> bool:
    """Panels against step: the discriminator's and the generator's losses (apart), D's accuracies, diversity."""
    panels = [("discriminator loss", ["train/loss_d"]), ("generator loss", ["train/loss_g"]),
              ("D accuracy", ["train/d_acc_real", "train/d_acc_fake", "val/d_acc_real", "val/d_acc_fake"]),
              ("diversity (generated / real)", ["train/diversity", "val/diversity", "val/feature_diversity"])]
    if not any("train/loss_d" in r for r in rows):
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if k.startswith("val") else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


@tasks.register("gan", config=GANTaskConfig)
def gan(cfg: GANTaskConfig, spec) -> GANTask:
    """Adversarial training of a generator and a discriminator (gan, wgan-gp, hinge losses), FID/IS metrics."""
    return GANTask(cfg, spec)
