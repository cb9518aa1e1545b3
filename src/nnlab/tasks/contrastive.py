"""SimCLR contrastive pretraining (Chen et al. 2020, arXiv:2002.05709): two augmented views of every image of a
batch, made here on the batch as tensors (no per-sample Python), and the NT-Xent loss between their projections;
labels are never used for training, only by the kNN monitor.

    views:   undo the loader's normalisation -> random resized crop + horizontal flip (one affine grid per image,
             `grid_sample`) -> colour jitter (brightness, contrast, saturation, hue as a chroma rotation in YIQ;
             with probability `jitter_p`, in one random order per batch) -> grayscale (`gray_p`) -> normalise
    loss:    NT-Xent: each of the 2B views must pick its partner among the other 2B - 1 (cross-entropy over cosine
             similarities / temperature)
    monitor: kNN accuracy (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
             Discrimination"): the encoder's features (before the projector, no augmentation) of each evaluated
             image vote among its k most cosine-similar training images, each vote weighted exp(sim / knn_t)

The random draws come from a `torch.Generator` on the batch's device, seeded per training step from torch's
global RNG, which the loop seeds from `train.seed` and every checkpoint saves and restores: a run is reproducible
and a resumed run draws the views an uninterrupted one would. Evaluation views use a fixed seed (`eval_seed`), so
the evaluation loss compares across steps and runs.

The kNN bank is the labelled train split of `knn_data` (the shipped recipes set it to `${data}`, the run's own
dataset: it is loaded a second time, once, at the first evaluation), capped at `knn_bank` images (a fixed random
sample). It is embedded once per evaluation (whenever the weights changed since the last one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import run as R
from ..config import check
from ..data import Batch
from ..data.image import ImageSpec
from ..errors import UserError
from ..report import pyplot, save_figure
from . import TaskBase, tasks

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights (grayscale, saturation and contrast pivots)
# RGB -> YIQ (NTSC): Y is luma, (I, Q) the chroma plane a hue shift rotates
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@runtime_checkable
class Embeds(Protocol):
    def features(self, x: Tensor) -> Tensor:
        """The representation (B, c) of images x (B, C, H, W), before any projection head."""


@dataclass
class SimCLRTaskConfig:
    name: str = "simclr"
    temperature: float = 0.2  # NT-Xent temperature tau (SimCLR: 0.5 on CIFAR-10 at batch 1024; 0.1-0.5 all work)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # area fraction of each random crop
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # aspect-ratio range of the crops
    crop_size: int = 0  # side of each view in pixels, the crop resized to it (0: the images' own side)
    flip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.5  # colour-jitter strength s: brightness, contrast, saturation +-0.8s, hue +-0.2s (SimCLR)
    jitter_p: float = 0.8  # probability that an image's view is colour-jittered
    gray_p: float = 0.2  # probability that a view is turned to grayscale
    eval_seed: int = 0  # seed of the evaluation views (the same views at every evaluation)
    knn_k: int = 200  # neighbours that vote in the kNN monitor; 0: no kNN monitor
    knn_t: float = 0.1  # each vote weighs exp(similarity / knn_t) (Wu et al. 2018); 0: plain majority votes
    knn_bank: int = 10000  # training images in the kNN bank (a fixed random sample); 0: the whole train split
    knn_data: dict[str, Any] = field(default_factory=dict)  # dataset whose labelled train split is the bank: the
    #   recipes set `${data}` (the run's own data section); empty: no kNN monitor (the best checkpoint by val/loss)

    def __post_init__(self) -> None:
        check(self.temperature > 0, "task.temperature", "must be > 0")
        check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "task.crop_scale",
            "must be [low, high] with 0 < low <= high <= 1",
        )
        check(
            len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "task.crop_ratio",
            "must be [low, high] with 0 < low <= high",
        )
        check(self.crop_size >= 0, "task.crop_size", "must be >= 0")
        for key in ("flip", "jitter_p", "gray_p"):
            check(0 <= getattr(self, key) <= 1, f"task.{key}", "must be a probability in [0, 1]")
        check(0 <= self.jitter <= 1.25, "task.jitter", "must be in [0, 1.25] (a factor range of +-0.8s)")
        check(
            self.knn_k >= 0 and self.knn_t >= 0 and self.knn_bank >= 0,
            "task.knn_k",
            "knn_k must be >= 0, knn_t >= 0 and knn_bank >= 0",
        )
        check(not self.knn_data or "name" in self.knn_data, "task.knn_data", "must be a data section with a name")


# ------------------------------------------------------------------------------------------------ the loss
def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent (SimCLR's normalised temperature-scaled cross-entropy) of the projections z1, z2 (B, d) of two views
    of the same B images, and the number of views whose most similar other view is their partner.

    With z the 2B unit-normalised projections and s_ij = z_i . z_j / temperature, view i's loss is
    -log(exp(s_ip) / sum_{k != i} exp(s_ik)), p its partner; the loss is the mean over all 2B views."""
    n = len(z1)
    with torch.autocast(z1.device.type, enabled=False):  # the similarities in fp32, whatever the autocast
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, d)
        sim = z @ z.T / temperature  # (2B, 2B)
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # never itself
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # (2B,)
        loss = F.cross_entropy(sim, partner)
        hits = (sim.argmax(1) == partner).sum()
    return loss, hits


# --------------------------------------------------------------------------------------- the augmentations
def resized_crops(
    x: Tensor, size: int, scale: list[float], ratio: list[float], flip: float, g: torch.Generator
) -> Tensor:
    """Random resized crops of images x (B, C, H, W), each resized to (size, size) and flipped horizontally with
    probability `flip`: one affine sampling grid per image (bilinear `grid_sample`), no loop.

    Each crop covers a fraction U(scale) of the image's area with an aspect ratio log-uniform in `ratio`, as
    torchvision's RandomResizedCrop; where that would not fit, its sides are cut to the image's (torchvision
    redraws instead, up to 10 times), and its centre is uniform over the positions where it fits."""
    b, c, _, _ = x.shape
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(scale[0], scale[1], generator=g)
    aspect = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # (B,) crop width as a fraction of the image's
    h = (area / aspect).sqrt().clamp(max=1.0)  # (B,) crop height
    cx = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - w)  # centre in [-1 + w, 1 - w] (grid units)
    cy = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - h)
    flipped = torch.rand(b, device=dev, generator=g) < flip
    theta = torch.zeros(b, 2, 3, device=dev)  # output grid [-1, 1]^2 -> input coordinates
    theta[:, 0, 0] = torch.where(flipped, -w, w)  # a negative x-scale mirrors the crop
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_jitter(x: Tensor, strength: float, p: float, g: torch.Generator) -> Tensor:
    """SimCLR's colour distortion of images x (B, C, H, W) in [0, 1]: with probability p per image, brightness,
    contrast and saturation factors U(1 - 0.8s, 1 + 0.8s) and a hue shift U(-0.2s, 0.2s) of a turn, applied in one
    random order per batch (torchvision draws one per image) and clipped to [0, 1] after each. The hue shift rotates
    the chroma plane (I, Q) of YIQ, a linear stand-in for HSV's hue. Grayscale images get brightness and contrast."""
    b, c = x.shape[:2]
    dev = x.device
    on = torch.rand(b, device=dev, generator=g) < p  # (B,) which images are jittered

    def factor(spread: float) -> Tensor:  # (B, 1, 1, 1) factors 1 + U(-spread, spread)
        return 1 + torch.empty(b, 1, 1, 1, device=dev).uniform_(-spread, spread, generator=g)

    s = 0.8 * strength
    bright, contrast, saturation = factor(s), factor(s), factor(s)
    turn = torch.empty(b, device=dev).uniform_(-0.2 * strength, 0.2 * strength, generator=g)  # (B,) hue, in turns
    order = torch.randperm(4, device=dev, generator=g).tolist() if c == 3 else [0, 1]
    out = x
    for op in order:
        if op == 0:
            out = out * bright
        elif op == 1:  # towards the image's mean luma
            m = luma(out).mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
            out = (out - m) * contrast + m
        elif op == 2:  # towards each pixel's luma
            y = luma(out)
            out = y + (out - y) * saturation
        else:
            out = hue_rotate(out, turn)
        out = out.clamp(0, 1)
    return torch.where(on.view(b, 1, 1, 1), out, x)


def luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB images, or the single channel of grayscale ones."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("c,bchw->bhw", torch.tensor(LUMA, device=x.device, dtype=x.dtype), x)[:, None]


def hue_rotate(x: Tensor, turn: Tensor) -> Tensor:
    """Rotate the chroma of RGB images x (B, 3, H, W) by `turn` (B,) turns in YIQ space: one 3x3 matrix per image."""
    t = torch.tensor(YIQ, device=x.device, dtype=x.dtype)  # (3, 3) RGB -> YIQ
    cos, sin = torch.cos(2 * math.pi * turn), torch.sin(2 * math.pi * turn)
    rot = torch.zeros(len(x), 3, 3, device=x.device, dtype=x.dtype)  # (B, 3, 3): identity on Y, rotation on IQ
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    m = torch.eye(3, device=x.device) + torch.linalg.inv(t) @ (rot - torch.eye(3, device=x.device)) @ t  # (B, 3, 3)
    #   RGB -> RGB: T^-1 R T, written I + T^-1 (R - I) T so that a zero turn is exactly the identity
    return torch.einsum("bij,bjhw->bihw", m, x)


def grayscale(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Each RGB image of x (B, 3, H, W) turned to its luma (in all 3 channels) with probability p."""
    gray = torch.rand(len(x), device=x.device, generator=g) < p
    if x.shape[1] == 1:
        return x
    return torch.where(gray.view(-1, 1, 1, 1), luma(x).expand_as(x), x)


# ------------------------------------------------------------------------------------------------ the kNN
def knn_predict(query: Tensor, bank: Tensor, bank_y: Tensor, k: int, t: float, num_classes: int) -> Tensor:
    """Classes (B,) of unit feature vectors query (B, c) by the k most cosine-similar of bank (N, c), labels
    bank_y (N,): each neighbour votes for its class with weight exp(similarity / t) (Wu et al. 2018), or 1 if
    t == 0 (majority). Ties go to the lowest class index."""
    with torch.autocast(query.device.type, enabled=False):
        sim = query.float() @ bank.float().T  # (B, N) cosine similarities
        top, idx = sim.topk(min(k, len(bank)), dim=1)  # (B, k)
        # exp(sim / t) up to a factor per query (exp(-best / t)), which leaves its vote unchanged: no overflow
        weight = ((top - top[:, :1]) / t).exp() if t > 0 else torch.ones_like(top)
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, bank_y[idx], weight)  # (B, num_classes)
    return votes.argmax(1)


# ------------------------------------------------------------------------------------------------ the task
class SimCLR(TaskBase):
    def __init__(self, cfg: SimCLRTaskConfig, spec: ImageSpec):
        if not isinstance(spec, ImageSpec):
            raise UserError(f"task 'simclr' needs image data, got data of kind '{spec.kind}'")
        self.cfg, self.spec = cfg, spec
        self.knn = bool(cfg.knn_data) and cfg.knn_k > 0  # the kNN monitor is on
        self.monitor = "knn_acc" if self.knn else "loss"
        self.size = cfg.crop_size or spec.input_shape[-1]
        c = spec.input_shape[0]
        self.mean = torch.tensor(spec.mean or (0.0,) * c).view(1, c, 1, 1)
        self.std = torch.tensor(spec.std or (1.0,) * c).view(1, c, 1, 1)
        self._bank: tuple[Tensor, Tensor] | None = None  # (N, C, H, W) uint8 images, (N,) labels, on the CPU
        self._embedded: tuple[Any, Tensor, Tensor] | None = None  # (weights' fingerprint, (N, c) features, (N,) y)

    # --- views ------------------------------------------------------------------------------------------------
    def views(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Two augmented views of each normalised image of x (B, C, H, W): (2B, C, size, size), normalised, all
        first views then all second views (channels-last if x is)."""
        c = self.cfg
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        pixels = (x.float() * std + mean).clamp(0, 1)  # undo the loader's normalisation: [0, 1]
        pixels = torch.cat([pixels, pixels])  # (2B, C, H, W): every draw below is independent per view
        v = resized_crops(pixels, self.size, c.crop_scale, c.crop_ratio, c.flip, g)
        v = grayscale(colour_jitter(v, c.jitter, c.jitter_p, g), c.gray_p, g)
        v = (v - mean) / std
        return (
            v.contiguous(memory_format=torch.channels_last)
            if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
            else v
        )

    def step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x = batch["x"]  # (B, C, H, W) normalised; the labels are not read
        seed = int(torch.randint(0, 2**62, (1,)))  # global RNG: seeded by the loop, saved with every checkpoint
        v = self.views(x, torch.Generator(x.device).manual_seed(seed))
        z = model(v)  # (2B, d): one forward for both views, so BatchNorm sees them together
        loss, hits = nt_xent(z[: len(x)], z[len(x) :], self.cfg.temperature)
        return {"loss": loss, "pair_acc": hits / (2 * len(x))}

    # --- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_stats(self, model: nn.Module, batch: Batch, final: bool = True) -> dict[str, Tensor]:
        """NT-Xent on fixed-seed views of the batch, and (with a kNN bank) kNN-correct counts: sums."""
        x, y = batch["x"], batch["y"]
        v = self.views(x, torch.Generator(x.device).manual_seed(self.cfg.eval_seed))
        z = model(v)
        loss, hits = nt_xent(z[: len(x)], z[len(x) :], self.cfg.temperature)
        stats = {
            "loss_sum": loss.double() * len(x),
            "pair_hits": hits.long(),
            "n": torch.tensor(len(x), device=x.device),
        }
        if self.knn:
            if not isinstance(model, Embeds):
                raise UserError(
                    f"the kNN monitor needs a model with features(x) (e.g. model.name=simclr), not "
                    f"{type(model).__name__}; or turn the monitor off: task.knn_k=0"
                )
            bank, bank_y = self.embed_bank(model, x)
            query = F.normalize(model.features(x).float(), dim=1)  # (B, c)
            pred = knn_predict(query, bank, bank_y, self.cfg.knn_k, self.cfg.knn_t, self.spec.num_classes)
            stats["knn_hits"] = (pred == y).sum()
        return stats

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        n = max(int(stats["n"]), 1)
        out = {"loss": float(stats["loss_sum"]) / n, "pair_acc": int(stats["pair_hits"]) / (2 * n)}
        if "knn_hits" in stats:
            out["knn_acc"] = int(stats["knn_hits"]) / n
        return out

    # --- the kNN bank -----------------------------------------------------------------------------------------
    def bank(self) -> tuple[Tensor, Tensor]:
        """The bank's uint8 images (N, C, H, W) and labels (N,): a fixed random sample of `knn_bank` images of the
        labelled train split of `knn_data`, read once."""
        if self._bank is None:
            from ..config import section_from_dict
            from ..data import datasets

            data = datasets[str(self.cfg.knn_data["name"])].factory(section_from_dict(datasets, self.cfg.knn_data))
            theirs = data.spec
            if (
                getattr(theirs, "input_shape", None) != self.spec.input_shape
                or getattr(theirs, "num_classes", None) != self.spec.num_classes
            ):
                raise UserError(
                    f"task.knn_data '{self.cfg.knn_data['name']}' holds images "
                    f"{getattr(theirs, 'input_shape', '?')} in {getattr(theirs, 'num_classes', '?')} "
                    f"classes, this run's data {self.spec.input_shape} in {self.spec.num_classes}"
                )
            loader = data.loader("train", 1000)
            n = loader.size
            keep = torch.zeros(n, dtype=torch.bool)
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))
            keep[pick[: self.cfg.knn_bank or n]] = True
            xs, ys, start = [], [], 0
            for b in loader.epoch(0):  # in order, unaugmented, normalised by that data's statistics
                mask = keep[start : start + len(b)]
                xs.append(theirs.pixels(b["x"][mask]))
                ys.append(b["y"][mask].cpu())
                start += len(b)
            self._bank = (torch.cat(xs), torch.cat(ys))
        return self._bank

    @torch.no_grad()
    def embed_bank(self, model: Embeds, like: Tensor) -> tuple[Tensor, Tensor]:
        """Unit features (N, c) and labels (N,) of the bank under the model's current weights, on `like`'s
        device; computed again only when the weights (or BatchNorm statistics) changed since the last call."""
        state = model.state_dict().values()  # type: ignore[attr-defined]
        mark = (
            id(model),
            like.device,
            torch.stack([t.detach().double().sum() for t in state if t.is_floating_point()]).cpu(),
        )
        if (
            self._embedded is None
            or self._embedded[0][:2] != mark[:2]
            or not torch.equal(self._embedded[0][2], mark[2])
        ):
            images, y = self.bank()
            cl = like.is_contiguous(memory_format=torch.channels_last) and like.shape[1] > 1
            feats = []
            for chunk in images.split(1000):
                xb = self.spec.normalize(chunk.to(like.device))
                xb = xb.contiguous(memory_format=torch.channels_last) if cl else xb
                feats.append(F.normalize(model.features(xb).float(), dim=1))
            self._embedded = (mark, torch.cat(feats), y.to(like.device))
        return self._embedded[1], self._embedded[2]

    # --- report -----------------------------------------------------------------------------------------------
    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        """The kNN figures, and a grid of test images with two of their training views each."""
        final = summary.get("final", {})
        lines = ["", "## SimCLR", ""]
        knn = [f"{k} {v:.4f}" for k, v in final.items() if k.endswith("knn_acc")]
        if knn:
            bank = self.cfg.knn_bank or "all"
            vote = f"weights exp(sim/{self.cfg.knn_t})" if self.cfg.knn_t else "majority"
            lines.append(
                f"- kNN accuracy (k={self.cfg.knn_k}, {vote}, bank of {bank} training images): " + ", ".join(knn)
            )
        if summary.get("samples_per_s"):
            lines.append(f"- training: {summary['samples_per_s']:,.0f} images/s (two views each)")
        if data is not None and "test" in data.splits:
            x = next(iter(data.loader("test", 8).epoch(0)))["x"]
            g = torch.Generator().manual_seed(self.cfg.eval_seed)
            v = self.views(x.float().contiguous(), g)
            plot_views(
                self.spec.pixels(x), self.spec.pixels(v[:8]), self.spec.pixels(v[8:]), folder / R.PLOTS / "views.png"
            )
            lines += ["", "### Test images (top) and two augmented views of each", "", "![views](plots/views.png)"]
        return lines


def plot_views(images: Tensor, first: Tensor, second: Tensor, path: Path) -> None:
    """Three rows of uint8 images (N, C, H, W): originals, first views, second views."""
    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.1 * n, 3.5), squeeze=False)
    for r, row in enumerate((images, first, second)):
        for i in range(n):
            img = row[i].permute(1, 2, 0).numpy()
            axes[r][i].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", interpolation="nearest")
            axes[r][i].axis("off")
    save_figure(fig, path)


@tasks.register("simclr", config=SimCLRTaskConfig)
def simclr(cfg: SimCLRTaskConfig, spec: ImageSpec) -> SimCLR:
    """SimCLR contrastive pretraining: NT-Xent between two batched augmented views; kNN-accuracy monitor."""
    return SimCLR(cfg, spec)
