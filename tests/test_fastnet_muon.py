"""FastNet (airbench-style speed net) and the Muon optimizer: shapes, whitening init, orthogonalised steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnlab.data import Batch
from nnlab.data.image import ImageSpec
from nnlab.models import build, models
from nnlab.models.fastnet import FastNetConfig, PatchWhiten
from nnlab.muon import Muon, orthogonalize

SPEC = ImageSpec(input_shape=(3, 32, 32), num_classes=10, classes=[str(i) for i in range(10)])


def correlated_images(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images with strong cross-channel and neighbouring-pixel correlations: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size + 2, size + 2, generator=g)
    x = F.avg_pool2d(x, 3, stride=1)  # spatial correlation
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.2]])
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.3  # channel mixing and a mean offset


def test_fastnet_forward_backward_shapes() -> None:
    assert "fastnet" in models
    model = build("fastnet", FastNetConfig(), SPEC)
    x = torch.randn(2, 3, 32, 32)
    model.init_from_data(Batch(x=x))
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.whiten.weight.grad is None and not model.whiten.weight.requires_grad
    assert model.whiten.bias.grad is not None
    assert model.groups[0].norm1.weight.grad is None  # BN scale frozen at 1, only the shift trains
    assert all(c.grad is not None for c in model.groups.parameters() if c.ndim == 4)


def test_fastnet_bf16_autocast_channels_last() -> None:
    model = build("fastnet", FastNetConfig(widths=[8, 16, 16]), SPEC).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.init_from_data(Batch(x=x))
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(model.head.weight.grad).all()


def test_whitening_decorrelates_patches() -> None:
    x = correlated_images()
    layer = PatchWhiten(3, patch=2, eps=1e-6)
    layer.init_from_data(x)
    w = layer.weight  # (24, 3, 2, 2)
    d = layer.dim
    assert torch.equal(w[d:], -w[:d])
    y = F.conv2d(x, w[:d])  # (n, 12, 15, 15): whitened patches, no bias
    y = y.permute(0, 2, 3, 1).reshape(-1, d).double()
    cov = y.T @ y / len(y)  # uncentred, like the statistics the layer was fit on
    raw = F.unfold(x, 2).transpose(1, 2).reshape(-1, d).double()  # (patches, 12)
    raw_cov = raw.T @ raw / len(raw)
    assert (raw_cov - torch.diag(raw_cov.diag())).abs().max() > 0.1  # the data really was correlated
    evals = torch.linalg.eigvalsh(raw_cov)
    expected = torch.diag(evals / (evals + 1e-6))  # identity, shrunk by eps on the tiniest eigenvalues
    assert torch.allclose(cov, expected, atol=1e-4)
    assert (cov - torch.eye(d, dtype=cov.dtype)).abs().max() < 1e-2


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (16, 8, 3, 3)])
def test_muon_update_is_orthogonal(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    before = p.detach().clone()
    Muon([p], lr=1.0, momentum=0.0).step()
    rows = shape[0]
    update = (before - p.detach()).reshape(rows, -1)  # (rows, cols)
    update = update / max(1.0, update.size(0) / update.size(1)) ** 0.5  # undo the tall-matrix scale
    sv = torch.linalg.svdvals(update)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv  # Newton-Schulz with these coefficients: ~[0.7, 1.2]
    u, _, vh = torch.linalg.svd(p.grad.reshape(rows, -1), full_matrices=False)
    exact = u @ vh  # U V^T
    assert (update - exact).norm() / exact.norm() < 0.25


def test_orthogonalize_matches_svd_dtype_choice() -> None:
    g = torch.randn(24, 40)
    out = orthogonalize(g, steps=5)
    assert out.dtype == torch.float32  # fp32 on CPU (bf16 matmuls are much slower there)
    assert orthogonalize(g, steps=5, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_muon_decreases_least_squares_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    target = torch.randn(16, 32) / 32**0.5
    y = x @ target.T  # (256, 16)
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = (x @ w.T - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.2 * losses[0], losses
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(3))])  # 1-D parameters belong to another optimizer


def test_parameter_groups_follow_airbench() -> None:
    """cifar10-fast's optimizer: Muon on hidden filters; decoupled decay (the same fraction per step for every
    SGD group, biases included); the whitening bias's lr falls linearly to zero over its own epochs, then stays."""
    from nnlab.config import load_config
    from nnlab.optim import build_optimizer, set_lr

    cfg = load_config("cifar10-fast")
    t = cfg.train
    model = build("fastnet", cfg.model, SPEC)
    opt = build_optimizer(model, cfg.optim)
    groups = opt.param_groups
    owner = {id(p): n for n, p in model.named_parameters()}
    names = [[owner[id(p)] for p in g["params"]] for g in groups]
    assert sum(map(len, names)) == sum(p.requires_grad for p in model.parameters())
    short = next(g for g, n in zip(groups, names, strict=True) if n == ["whiten.bias"])
    muon = [g for g in groups if "ns_steps" in g]
    assert len(muon) == 1 and all(p.ndim == 4 for p in muon[0]["params"])
    for g in groups:
        if g not in muon:  # lr * weight_decay: the fraction removed per step, for every group the same
            assert g["base_lr"] * g["weight_decay"] == pytest.approx(cfg.optim.weight_decay)
    spe = 25
    set_lr(opt, 0, 200, spe, t)
    assert short["lr"] == short["base_lr"]
    set_lr(opt, 50, 200, spe, t)  # 2/3 of the way through the bias's 3 epochs, 1/4 of the main schedule
    assert short["lr"] == pytest.approx(short["base_lr"] / 3)
    assert groups[0]["lr"] == pytest.approx(groups[0]["base_lr"] * 0.75)
    set_lr(opt, 100, 200, spe, t)
    assert short["lr"] == 0.0 and groups[0]["lr"] > 0
