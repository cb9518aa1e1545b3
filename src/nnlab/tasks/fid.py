"""A domain FID and an Inception-Score analogue, with features from nnlab's own image classifier (nothing is
downloaded): docs/gan.md.

- **Features**: the penultimate activations of a trained classifier run (the input of its last linear layer, in
  evaluation mode; for `mnist-fid-classifier` the 128 ReLU units of the CNN's hidden layer), on images quantised to
  256 grey levels (what a PNG of them holds) and normalised as that classifier was trained.
- **FID** (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the features of two image sets,
  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), covariances unbiased (n - 1) as in pytorch-fid.
- **IS analogue** (Salimans et al. 2016, with the classifier in place of Inception): exp(E_x KL(p(y|x) || p(y))),
  p(y) the mean of p(y|x) over the set; 1 for a set whose every image gets the same prediction, the number of
  classes (10) for confident predictions spread evenly over the classes.

Both come from additive statistics (sums of features, of their outer products, of probabilities and of p log p),
so a split's value is exact when batches and processes are summed (`evaluate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import run as R
from ..errors import UserError


def frechet_distance(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    """The Fréchet distance between N(mu1, s1) and N(mu2, s2) (means (D,), covariances (D, D)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the symmetric
    positive semi-definite A S2 A with A = S1^(1/2) (XY and YX share eigenvalues; X = A, Y = A S2). Two symmetric
    eigen-decompositions (backward stable) replace scipy's `sqrtm(S1 @ S2)` of a non-symmetric product, which
    returns complex values with round-off imaginary parts and loses accuracy when the covariances are singular (a
    collapsed generator, fewer samples than features); tested equal to the scipy formula on full-rank matrices."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, s1, s2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    a = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
    m = a @ s2 @ a
    root_trace = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = mu1 - mu2
    return float(d @ d + s1.trace() + s2.trace() - 2 * root_trace)


def inception_score(p_sum: Tensor, plogp_sum: Tensor, n: int | Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from the sums over a set of n images of p(y|x) (K,) and of sum_y p log p."""
    n = float(n)
    p_y = p_sum.double() / n  # (K,) the marginal p(y)
    kl = float(plogp_sum) / n - float(torch.xlogy(p_y, p_y).sum())  # E_x sum_y p log p - sum_y p(y) log p(y)
    return float(torch.tensor(kl).exp())


def moments(prefix: str, x: Tensor) -> dict[str, Tensor]:
    """Additive statistics of the rows of x (B, D): their sum, the sum of their outer products, their count."""
    x = x.double()
    return {f"{prefix}_sum": x.sum(0), f"{prefix}_outer": x.T @ x, f"{prefix}_n": torch.tensor(len(x), device=x.device)}


def mean_cov(stats: dict[str, Any], prefix: str) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) from `moments` summed over batches."""
    n = float(stats[f"{prefix}_n"])
    mu = stats[f"{prefix}_sum"].double() / n
    cov = (stats[f"{prefix}_outer"].double() - n * torch.outer(mu, mu)) / max(n - 1, 1)
    return mu, cov


def quantise(images: Tensor) -> Tensor:
    """Images in [0, 1] rounded to 256 levels, as a PNG of them holds (real images come as uint8)."""
    return images.float().clamp(0, 1).mul(255).round().div(255)


@dataclass
class Classifier:
    """A trained image classifier as a feature extractor: `features(images)` -> (penultimate activations (B, D),
    class probabilities (B, K)), images (B, C, H, W) in [0, 1]."""

    net: nn.Module
    last: nn.Linear  # its final layer: the features are this layer's input
    mean: Tensor  # (1, C, 1, 1) the normalisation the classifier was trained with
    std: Tensor
    source: str  # the checkpoint folder it was read from

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []
        hook = self.last.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            with torch.autocast(images.device.type, enabled=False):  # fp32 always: one scale for every run
                logits = self.net((quantise(images) - self.mean) / self.std).float()
        finally:
            hook.remove()
        return seen[0].float().flatten(1), logits.softmax(-1)


def load_classifier(source: str, shape: tuple[int, ...], device: torch.device | str = "cpu",
                    key: str = "task.fid_classifier") -> Classifier:
    """The best checkpoint of an image-classification run (a run folder or a checkpoint folder, found as
    `init.from` finds runs), checked to classify images of `shape` (C, H, W)."""
    from ..config import section_from_dict
    from ..data import specs
    from ..models import build, models

    try:
        folder = R.checkpoint_dir(source, "best")
        meta = R.read_meta(folder)
    except UserError as e:
        raise UserError(f"{key}={source}: {e}; train a classifier first (`nnlab train mnist-fid-classifier`) and "
                        f"pass its run folder") from None
    task = (meta.get("config") or {}).get("task", {}).get("name")
    spec_fields = dict(meta.get("spec") or {})
    if task != "classification" or spec_fields.get("kind") != "image":
        raise UserError(f"{key}={source} is a run of task '{task}' on {spec_fields.get('kind')} data; the features "
                        f"must come from an image classifier (e.g. a run of `nnlab train mnist-fid-classifier`)")
    spec = specs["image"].factory(**spec_fields)
    if tuple(spec.input_shape) != tuple(shape):
        raise UserError(f"{key}={source} classifies images of shape {tuple(spec.input_shape)}, but these images are "
                        f"{tuple(shape)}: use a classifier trained on the same dataset")
    cfg = section_from_dict(models, meta["config"]["model"])
    net = build(cfg.name, cfg, spec)
    try:
        net.load_state_dict(R.load_weights(folder))
    except RuntimeError as e:
        raise UserError(f"{key}={source}: its weights do not fit its model ({str(e).splitlines()[0]})") from None
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].out_features != spec.num_classes:
        raise UserError(f"{key}={source}: model '{cfg.name}' does not end in a linear layer over its classes, "
                        f"whose input would be the features")
    c = spec.input_shape[0]
    mean = torch.tensor(spec.mean or (0.0,) * c).view(1, c, 1, 1)
    std = torch.tensor(spec.std or (1.0,) * c).view(1, c, 1, 1)
    net = net.to(device).eval().requires_grad_(False)
    return Classifier(net, linears[-1], mean.to(device), std.to(device), str(folder))


def image_stats(prefix: str, images: Tensor, clf: Classifier) -> dict[str, Tensor]:
    """Additive statistics of images (B, C, H, W) in [0, 1] for FID and IS: feature moments, the sum of the class
    probabilities and of sum_y p log p."""
    f, p = clf.features(images)
    p = p.double()
    return moments(f"{prefix}_f", f) | {f"{prefix}_p_sum": p.sum(0), f"{prefix}_plogp": torch.xlogy(p, p).sum()}


def add(into: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """Sum `stats` into `into` key by key (tensors add; lists concatenate)."""
    for k, v in stats.items():
        into[k] = into[k] + v if k in into else v
    return into


def fid_is(stats: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """FID between the sets `a` and `b` of `image_stats` sums, the IS analogue of `b`, and the feature diversity
    of `b` relative to `a` (mean pairwise squared feature distance = 2 tr(S), so the ratio is tr(Sb) / tr(Sa))."""
    mu_a, cov_a = mean_cov(stats, f"{a}_f")
    mu_b, cov_b = mean_cov(stats, f"{b}_f")
    return {"fid": frechet_distance(mu_a, cov_a, mu_b, cov_b),
            "is": inception_score(stats[f"{b}_p_sum"], stats[f"{b}_plogp"], stats[f"{b}_f_n"]),
            "feature_diversity": float(cov_b.trace() / cov_a.trace().clamp(min=1e-12))}


@torch.no_grad()
def set_stats(clf: Classifier, images: Any, prefix: str = "x") -> dict[str, Tensor]:
    """`image_stats` summed over an iterable of image batches in [0, 1] (benchmarks: a whole dataset split)."""
    out: dict[str, Tensor] = {}
    for batch in images:
        add(out, image_stats(prefix, batch, clf))
    return out
