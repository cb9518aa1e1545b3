"""Generative vision's shared plumbing: image grids (`save_grid`), undoing the loader's normalisation (`to_unit`),
the model protocols `Generative` and `Autoencoding`, and the family commands. The autoencoder tasks (`ae`, `vae`)
are in tasks/autoencoder.py, the GAN's in tasks/gan.py; all of them use what is here.

    nnlab sample RUN --n 64 --out grid.png --seed 1      # runs of task vae or gan: prior samples
    nnlab reconstruct RUN --n 16                         # ae or vae: test images over their reconstructions
    nnlab interpolate RUN --steps 10 --rows 8            # ae, vae (between two test images' codes) or gan

What a model sees is its task's decision: the vision loader hands tasks images normalised by `spec.normalize`;
the `ae` and `vae` tasks give their models inputs in that same form (so an encoder transfers to a classifier with
`init.from`). What the protocols return (`decode`, `sample`, `reconstruct`) is pixels in [0, 1]. The commands cap
counts out of range with a line on stderr, and refuse an output path that cannot be written (exit 2).
See docs/generative.md.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .. import run as R
from ..errors import UserError
from ..registry import commands

MAX_SAMPLES = 1024  # most images `nnlab sample` draws into one grid
MAX_PAIRS = 256  # most test images `nnlab reconstruct` shows
MAX_STEPS, MAX_ROWS = 64, 64  # most columns and rows of `nnlab interpolate`
GRID_PAD = 2  # pixels of mid-grey between the images of a grid (and around it)


# --- the shared plumbing ---------------------------------------------------------------------------------------
@runtime_checkable
class Generative(Protocol):
    """A model that draws images from a prior over a latent vector z of `latent_dim` numbers."""

    latent_dim: int

    def decode(self, z: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] from latent vectors z (N, latent_dim)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` images (n, C, H, W) in [0, 1] from latents drawn from the prior (N(0, I)) with `generator`."""


@runtime_checkable
class Autoencoding(Protocol):
    """A model that maps an image to a code and back. `x` is the model's input as its task prepares it (for the
    tasks here: normalised like a classifier's input, see the module's docstring)."""

    def encode(self, x: Tensor) -> Tensor:
        """Deterministic codes (N, latent_dim) of images x (N, C, H, W): a VAE's posterior mean."""

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstructions (N, C, H, W) in [0, 1]: the decoding of `encode(x)`."""


def to_unit(x: Tensor, spec: Any) -> Tensor:
    """Images as the vision loader hands them (normalised with the ImageSpec's per-channel mean and std) back to
    pixels in [0, 1] (float32, clamped)."""
    x = x.float()
    if getattr(spec, "mean", ()):
        std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
        x = x * std + torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    return x.clamp(0.0, 1.0)


def from_unit(x: Tensor, spec: Any) -> Tensor:
    """The inverse of `to_unit`: pixels in [0, 1] normalised as the loader normalises them."""
    if getattr(spec, "mean", ()):
        x = x - torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
        x = x / torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return x


def grid_size(n: int, h: int, w: int, nrow: int | None = None, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_grid` writes for n images of h x w."""
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * (w * scale + GRID_PAD) + GRID_PAD, rows * (h * scale + GRID_PAD) + GRID_PAD


def save_grid(path: Path, images: Tensor, nrow: int | None = None, scale: int = 1) -> None:
    """Tile images (N, C, H, W) in [0, 1] (C = 1 or 3), `nrow` to a row (default: a square), each enlarged `scale`
    times (nearest neighbour), into one PNG written atomically; a missing folder is made. A path that cannot be
    written is a UserError naming it."""
    from PIL import Image

    path = Path(path)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_grid takes images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: an image grid is written as PNG: give a file name ending in .png")
    x = images.detach().float().cpu().nan_to_num(0.0).clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    width, height = grid_size(n, h, w, cols)
    canvas = torch.full((c, height, width), 0.5)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = GRID_PAD + r * (h + GRID_PAD), GRID_PAD + q * (w + GRID_PAD)
        canvas[:, top:top + h, left:left + w] = x[i]
    pixels = canvas.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if c == 1 else pixels, "L" if c == 1 else "RGB").save(buf, format="PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        R.atomic_write(path, buf.getvalue())
    except OSError as e:
        file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{file} is a file, not a folder" if file else e.strerror or e.__class__.__name__
        raise UserError(f"cannot write {path} ({why}): give a path in a folder you can write") from None


def view_scale(h: int) -> int:
    """How much to enlarge images of height h in grids meant for people (8x8 digits: 3x, MNIST: 1x)."""
    return max(1, 28 // h)


def capped(value: int, low: int, high: int, option: str, command: str) -> int:
    """`value` clamped into [low, high], saying so on stderr when it was outside."""
    if low <= value <= high:
        return value
    kept = min(max(value, low), high)
    print(f"nnlab {command}: {option} {value} is outside {low}..{high}: using {kept}", file=sys.stderr)
    return kept


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between rows of a and b (N, D) at fractions t (T,): (N, T, D). Between two draws
    of a Gaussian prior, it keeps the norm typical where a straight line passes near the origin (White 2016,
    "Sampling generative networks")."""
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((an * bn).sum(1).clamp(-1 + 1e-7, 1 - 1e-7))[:, None, None]  # (N, 1, 1)
    t = t[None, :, None]
    return (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / torch.sin(omega)


def _out_path(args: argparse.Namespace, default: str) -> Path:
    return Path(args.out) if args.out else Path(args.run) / R.PLOTS / default


def _test_images(loaded: Any, args: argparse.Namespace, n: int) -> Tensor:
    """The first n test images of the run's dataset, as its loader hands them (normalised)."""
    from ..config import load_config
    from ..data import datasets

    cfg = load_config(loaded.meta["config"], tuple(args.data_override))
    data = datasets[cfg.data.name].factory(cfg.data)
    split = "test" if "test" in data.splits else data.splits[-1]
    device = next(loaded.model.parameters()).device
    return next(iter(data.loader(split, n, device=device).epoch(0)))["x"]


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=64, help=f"images to draw, 1..{MAX_SAMPLES} (default 64)")
    p.add_argument("--out", default=None, help="PNG to write (default: the run's plots/sample.png)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each time)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: a square grid)")


@commands.register("sample", arguments=_sample_args, tasks=("vae", "gan"))
@torch.no_grad()
def sample(loaded: Any, args: argparse.Namespace) -> int:
    """Draw images from a generative run's prior into one PNG grid."""
    model = loaded.model.eval()
    if not isinstance(model, Generative):
        raise UserError(f"the model of {args.run} ({type(model).__name__}) has no prior to sample from")
    n = capped(args.n, 1, MAX_SAMPLES, "--n", "sample")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed) if args.seed is not None else gen.seed()
    images = model.sample(n, gen)
    path = _out_path(args, "sample.png")
    save_grid(path, images, args.nrow and capped(args.nrow, 1, n, "--nrow", "sample"), view_scale(images.shape[-2]))
    print(path)
    return 0


def _reconstruct_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=16, help=f"test images to reconstruct, 1..{MAX_PAIRS} (default 16)")
    p.add_argument("--out", default=None, help="PNG to write (default: the run's plots/reconstruct.png)")
    p.add_argument("--data-dir", help="folder holding the dataset folders (else $NNLAB_DATA, then ~/.cache/nnlab)")


def pairs_grid(inputs: Tensor, outputs: Tensor, per_row: int = 8) -> tuple[Tensor, int]:
    """Inputs over their outputs: rows of up to `per_row` inputs, each followed by a row of their outputs.
    Returns the images (2N', C, H, W) (N rounded up to whole rows, blank-filled) and the row length."""
    n = len(inputs)
    cols = min(per_row, n)
    rows = math.ceil(n / cols)
    blank = inputs.new_zeros(rows * cols - n, *inputs.shape[1:])
    a, b = torch.cat([inputs, blank]), torch.cat([outputs, blank])
    tiles = torch.stack([a.view(rows, cols, *a.shape[1:]), b.view(rows, cols, *b.shape[1:])], 1)  # (rows, 2, cols, ..)
    return tiles.flatten(0, 2), cols


@commands.register("reconstruct", arguments=_reconstruct_args, tasks=("ae", "vae"))
@torch.no_grad()
def reconstruct(loaded: Any, args: argparse.Namespace) -> int:
    """A grid of test images (odd rows) over their reconstructions (even rows)."""
    model, task = loaded.model.eval(), loaded.task
    n = capped(args.n, 1, MAX_PAIRS, "--n", "reconstruct")
    x_in, target = task.inputs(_test_images(loaded, args, n))
    images, cols = pairs_grid(target, model.reconstruct(x_in))
    path = _out_path(args, "reconstruct.png")
    save_grid(path, images, cols, view_scale(images.shape[-2]))
    print(path)
    return 0


def _interpolate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=10, help=f"images per walk, both ends included, 2..{MAX_STEPS} "
                   "(default 10)")
    p.add_argument("--rows", type=int, default=8, help=f"walks, one per row, 1..{MAX_ROWS} (default 8)")
    p.add_argument("--out", default=None, help="PNG to write (default: the run's plots/interpolate.png)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the prior draws (GAN; default: fresh)")
    p.add_argument("--data-dir", help="folder holding the dataset folders (else $NNLAB_DATA, then ~/.cache/nnlab)")


@commands.register("interpolate", arguments=_interpolate_args, tasks=("ae", "vae", "gan"))
@torch.no_grad()
def interpolate(loaded: Any, args: argparse.Namespace) -> int:
    """Latent walks, a row each: straight lines between the codes of two test images (autoencoders), or great
    circles between two draws from the prior (GANs)."""
    model = loaded.model.eval()
    steps = capped(args.steps, 2, MAX_STEPS, "--steps", "interpolate")
    rows = capped(args.rows, 1, MAX_ROWS, "--rows", "interpolate")
    device = next(model.parameters()).device
    t = torch.linspace(0, 1, steps, device=device)
    if isinstance(model, Autoencoding) and loaded.meta["config"]["task"]["name"] in ("ae", "vae"):
        x_in, _ = loaded.task.inputs(_test_images(loaded, args, 2 * rows))
        z = model.encode(x_in)
        rows = len(z) // 2
        a, b = z[:rows], z[rows:2 * rows]  # (rows, Z) each
        walk = a[:, None] + t[None, :, None] * (b - a)[:, None]  # (rows, steps, Z)
    elif isinstance(model, Generative):
        gen = torch.Generator(device=device)
        gen.manual_seed(args.seed) if args.seed is not None else gen.seed()
        ends = torch.randn(2, rows, model.latent_dim, generator=gen, device=device)
        walk = slerp(ends[0], ends[1], t)  # (rows, steps, Z)
    else:
        raise UserError(f"the model of {args.run} ({type(model).__name__}) has no latent space to walk")
    images = model.decode(walk.flatten(0, 1))  # (rows * steps, C, H, W)
    path = _out_path(args, "interpolate.png")
    save_grid(path, images, steps, view_scale(images.shape[-2]))
    print(path)
    return 0

