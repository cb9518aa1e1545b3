"""Every registered model: a tiny forward/backward on random inputs of the right shape."""

from __future__ import annotations

import pytest
import torch

from nnlab.config import section_from_dict
from nnlab.data import DataSpec
from nnlab.models import build, models


@pytest.mark.parametrize("name", models.names())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    spec = DataSpec(input_shape=(3, 32, 32), num_classes=10, classes=[str(i) for i in range(10)])
    cfg = section_from_dict(models, {"name": name})
    model = build(name, cfg, spec)
    x = torch.randn(4, 3, 32, 32)
    if hasattr(model, "init_from_data"):
        model.init_from_data(x)
    out = model(x)
    assert out.shape == (4, 10)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_model() -> None:
    from nnlab.errors import UserError

    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        models["resnet-18"]


def test_classification_tta_views() -> None:
    """TTA averages the logits of the flipped (and shifted) views in the final evaluation only."""
    from nnlab.tasks.classification import Classification, ClassificationConfig

    spec = DataSpec(input_shape=(1, 4, 4), num_classes=2, classes=["a", "b"])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    plain = Classification(ClassificationConfig(), spec)
    flip = Classification(ClassificationConfig(tta="flip"), spec)
    both = Classification(ClassificationConfig(tta="flip_translate"), spec)
    with torch.no_grad():
        expected = (net(x) + net(x.flip(-1))) / 2
        assert torch.allclose(flip.logits(net, x), expected, atol=1e-6)
        assert not torch.allclose(both.logits(net, x), expected, atol=1e-4)  # the shifted views count
        # during training (final=False) evaluation is plain, whatever the TTA setting
        assert torch.equal(both.eval_stats(net, (x, y), final=False)["loss_sum"],
                           plain.eval_stats(net, (x, y))["loss_sum"])
        assert not torch.equal(flip.eval_stats(net, (x, y))["loss_sum"], plain.eval_stats(net, (x, y))["loss_sum"])
