"""Datasets as in-memory tensors, and the one batch loader every task uses.

A dataset factory (registered in `datasets`) takes its config dataclass and returns a `Dataset`: uint8
(or integer) tensors per split plus a `DataSpec` saying what a model needs to know (input shape, classes,
normalisation). Batches are sliced from those tensors; augmentation runs batched on tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..registry import Registry

datasets = Registry("dataset")


@dataclass
class DataSpec:
    """What a model and `nnlab predict` need to know about the inputs; stored with every checkpoint."""

    input_shape: tuple[int, ...]  # one example, e.g. (C, H, W)
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...] = ()  # per-channel mean of inputs scaled to [0, 1]; () = no normalisation
    std: tuple[float, ...] = ()


@dataclass
class Dataset:
    spec: DataSpec
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (x, y)


def normalize(x: torch.Tensor, spec: DataSpec, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
    dtype = torch.float32
    x = x.to(dtype).div_(255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.mean:
        mean = torch.tensor(spec.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
    return x


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


class Loader:
    """Batches sliced from in-memory tensors.

    The order of an epoch is a pure function of (seed, epoch), and augmentation of (seed, epoch, batch),
    so a run resumed at any batch sees exactly the data an uninterrupted run would. Under distributed
    training each global batch is augmented whole (the same draws as one process) and cut into `world`
    equal shards; rank r takes shard r.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, augment: Augment | None = None,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)  # small datasets: hold them where we compute
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.augment, self.rank, self.world = seed, augment, rank, world
        self.transform = transform  # applied to each batch's inputs last, on the device (e.g. normalize)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches of `epoch`, beginning at batch index `start`."""
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment is not None and self.augment.enabled:
                g = torch.Generator(device=self.device)
                g.manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + i)
                x = self.augment(x, idx, epoch, g)
            if self.world > 1:  # (the whole global batch is gathered: cheap next to the step)
                x, idx = x.tensor_split(self.world)[self.rank], idx.tensor_split(self.world)[self.rank]
            yield (self.transform(x) if self.transform else x), self.y[idx]


from . import vision  # noqa: E402,F401  (registers the image datasets)
