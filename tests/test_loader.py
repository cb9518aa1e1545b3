"""The batch loader: deterministic order and augmentation, exact resume offsets, process shards, and
batched crops checked against torch's own padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnlab.data import Augment, Loader


def data(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8), torch.arange(n)


def test_order_is_a_function_of_seed_and_epoch_and_resume_is_exact() -> None:
    x, y = data()
    aug = Augment(crop_padding=2, flip="random", seed=3)
    loader = Loader(x, y, 8, shuffle=True, drop_last=True, seed=3, augment=aug)
    full = list(loader.epoch(1))
    again = list(Loader(x, y, 8, shuffle=True, drop_last=True, seed=3, augment=aug).epoch(1, start=2))
    assert len(full) == 6 and len(again) == 4
    for (xa, ya), (xb, yb) in zip(full[2:], again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(full[0][1], list(loader.epoch(2))[0][1])  # a new order each epoch


def test_shards_cover_each_global_batch() -> None:
    """Two processes see, augmentation included, exactly the images one process sees."""
    x, y = data()
    aug = Augment(crop_padding=2, flip="random", seed=1)
    whole = list(Loader(x, y, 8, shuffle=True, seed=1, augment=aug).epoch(0))
    parts = [list(Loader(x, y, 8, shuffle=True, seed=1, augment=aug, rank=r, world=2).epoch(0)) for r in range(2)]
    for i, (xb, yb) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), yb)
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), xb)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_batched_crop_matches_torch_padding(mode: str) -> None:
    x, _ = data(16)
    gen = torch.Generator().manual_seed(5)
    out = Augment(crop_padding=2, padding_mode=mode)(x, torch.arange(16), 0, gen)
    gen = torch.Generator().manual_seed(5)  # replay the offsets the augmentation drew
    dy, dx = torch.randint(0, 5, (16,), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="constant" if mode == "zeros" else "reflect")
    for i in range(16):
        assert torch.equal(out[i].float(), padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 6])


def test_alternating_flip_flips_every_image_on_odd_epochs() -> None:
    x, _ = data(16)
    aug, idx, g = Augment(flip="alternate", seed=1), torch.arange(16), torch.Generator()
    e0, e1 = aug(x, idx, 0, g), aug(x, idx, 1, g)
    flipped0 = [not torch.equal(e0[i], x[i]) for i in range(16)]
    for i in range(16):  # each image is flipped in exactly one of two consecutive epochs
        assert torch.equal(e1[i], x[i] if flipped0[i] else x[i].flip(-1))
    assert 0 < sum(flipped0) < 16  # a random half to start with
