"""The image domain: `ImageSpec` (shape, classes, normalisation; reads image files for `predict`), batched
augmentation on uint8 tensors (`Augment`), and reading one image file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from . import Batch, Spec, specs


@specs.register("image")
@dataclass(kw_only=True)
class ImageSpec(Spec):
    """Images in classes: what a model, a task and `predict` need to know; stored with every checkpoint."""

    kind: str = "image"
    input_shape: tuple[int, ...]  # one example, (C, H, W)
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...] = ()  # per-channel mean of inputs scaled to [0, 1]; () = no normalisation
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.input_shape = tuple(self.input_shape)
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
        x = x.to(torch.float32).div_(255.0)
        if self.mean:
            x = x.sub_(torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1))
            x = x.div_(torch.tensor(self.std, device=x.device).view(1, -1, 1, 1))
        return x

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: uint8 images (B, C, H, W) to look at."""
        x = x.float().cpu()
        if self.mean:
            x = x * torch.tensor(self.std).view(1, -1, 1, 1) + torch.tensor(self.mean).view(1, -1, 1, 1)
        return x.mul(255).round().clamp(0, 255).to(torch.uint8)

    def encode(self, inputs) -> tuple[Batch | None, list[str | None]]:
        images, errors = [], []
        for f in inputs:
            try:
                images.append(read_image(f, self.input_shape))
                errors.append(None)
            except UserError as e:
                errors.append(str(e))
        return (Batch(x=self.normalize(torch.stack(images))) if images else None), errors

    def example(self, n: int) -> Batch:
        return Batch(x=torch.randn(n, *self.input_shape), y=torch.randint(0, self.num_classes, (n,)))


def read_image(path, shape: tuple[int, ...]) -> torch.Tensor:
    """An image file as uint8 (C, H, W) in the model's input size and channel count."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if c == 1 else t.permute(2, 0, 1).contiguous()


@dataclass
class Augment:
    """Batched image augmentation on uint8 tensors (B, C, H, W)."""

    crop_padding: int = 0  # random translation by up to this many pixels (zero-padded random crop)
    flip: str = "none"  # none | random | alternate (each image flipped on every other epoch, random start)
    seed: int = 0
    padding_mode: str = "zeros"  # what the crop sees outside the image: zeros | reflect

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding) or self.flip != "none"

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> torch.Tensor:
        if self.flip == "random":
            mask = torch.rand(len(x), generator=gen, device=x.device) < 0.5
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        elif self.flip == "alternate":  # derandomised flips (Jordan 2024, airbench)
            base = ((idx * 2654435761 + self.seed * 97) >> 13) & 1  # fixed pseudo-random bit per image
            mask = (base ^ (epoch % 2)).bool()
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        p = self.crop_padding
        if p:
            b, c, h, w = x.shape
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
            rows = dy[:, None] - p + torch.arange(h, device=x.device)  # (B, H) source row of each output row
            cols = dx[:, None] - p + torch.arange(w, device=x.device)  # (B, W)
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(c, device=x.device)[None, :, None, None]
            if self.padding_mode == "reflect":  # mirror indices at the border, as F.pad(mode="reflect")
                rows, cols = _reflect(rows, h), _reflect(cols, w)
                x = x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
            else:
                xp = torch.nn.functional.pad(x, (p, p, p, p))
                x = xp[bi, ci, (rows + p)[:, None, :, None], (cols + p)[:, None, None, :]]  # (B, C, H, W)
        return x


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)
