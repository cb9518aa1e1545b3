"""The batch loader: deterministic order and augmentation, exact resume offsets, process shards, and
batched crops checked against torch's own padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnlab.data import Batch, Loader, pad
from nnlab.data.image import Augment


def data(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8), torch.arange(n)


def image_loader(x, y, batch_size, aug=None, **kw) -> Loader:
    """As the image datasets build it: gather the rows, augment them with the batch's generator."""
    def make(idx, epoch, gen):
        xb = aug(x[idx], idx, epoch, gen) if aug is not None else x[idx]
        return Batch(x=xb, y=y[idx])

    return Loader(len(x), batch_size, make, **kw)


def test_order_is_a_function_of_seed_and_epoch_and_resume_is_exact() -> None:
    x, y = data()
    aug = Augment(crop_padding=2, flip="random", seed=3)
    loader = image_loader(x, y, 8, aug, shuffle=True, drop_last=True, seed=3)
    full = list(loader.epoch(1))
    again = list(image_loader(x, y, 8, aug, shuffle=True, drop_last=True, seed=3).epoch(1, start=2))
    assert len(full) == 6 and len(again) == 4
    for a, b in zip(full[2:], again, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert not torch.equal(full[0]["y"], list(loader.epoch(2))[0]["y"])  # a new order each epoch


def test_shards_cover_each_global_batch() -> None:
    """Two processes see, augmentation included, exactly the images one process sees."""
    x, y = data()
    aug = Augment(crop_padding=2, flip="random", seed=1)
    whole = list(image_loader(x, y, 8, aug, shuffle=True, seed=1).epoch(0))
    parts = [list(image_loader(x, y, 8, aug, shuffle=True, seed=1, rank=r, world=2).epoch(0)) for r in range(2)]
    for i, b in enumerate(whole):
        for k in ("x", "y"):
            assert torch.equal(torch.cat([parts[0][i][k], parts[1][i][k]]), b[k])


def test_length_buckets_keep_padding_small_and_cover_every_example() -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.arange(int(n)) for n in torch.randint(1, 40, (96,), generator=g)]
    lengths = torch.tensor([len(s) for s in seqs])

    def make(idx, epoch, gen):
        ids, mask = pad([seqs[i] for i in idx.tolist()])
        return Batch(ids=ids, mask=mask, idx=idx)

    plain = list(Loader(96, 8, make, shuffle=True, seed=2).epoch(0))
    bucketed = list(Loader(96, 8, make, shuffle=True, seed=2, lengths=lengths, bucket=4).epoch(0))
    padded = [sum(b["mask"].numel() for b in bs) for bs in (plain, bucketed)]
    assert padded[1] < 0.8 * padded[0]  # far less padding
    assert sorted(torch.cat([b["idx"] for b in bucketed]).tolist()) == list(range(96))
    for b in bucketed:  # the mask marks exactly each sequence's tokens
        assert b["mask"].sum(1).tolist() == lengths[b["idx"]].tolist()


def test_batch_split_and_lists() -> None:
    b = Batch(x=torch.arange(5), targets=[{"boxes": torch.zeros(i, 4)} for i in range(5)])
    parts = b.split(2)
    assert [len(p) for p in parts] == [2, 3] and parts[1]["targets"][0]["boxes"].shape == (2, 4)
    assert len(b.to("cpu")) == 5


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
