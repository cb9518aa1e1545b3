"""Every registered model: a tiny forward/backward on an example batch drawn from the spec its registry entry
names (so a token model gets token ids, an image model images of its own size)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from nnlab.config import section_from_dict
from nnlab.data.conll import TagSpec
from nnlab.data.corpus import MaskedTextSpec
from nnlab.data.image import ImageSpec
from nnlab.data.sentences import TextSpec
from nnlab.data.text import TokenSpec
from nnlab.models import InitFromData, attend, build, models
from nnlab.tasks.generative import Autoencoding, Generative


@pytest.mark.parametrize("name", models.names())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    spec = models[name].meta["example"]
    cfg = section_from_dict(models, {"name": name})
    model = build(name, cfg, spec)
    batch = spec.example(4)
    if isinstance(model, InitFromData):
        model.init_from_data(batch)
    args = inspect.signature(model.forward).parameters  # a model takes the batch's fields by name
    out = model(**{k: batch[k] for k in args if k in batch})
    if isinstance(model, Autoencoding):  # reconstructions (a VAE: the decoder's parameters, first of a tuple)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape[0] == 4 and out.shape[2:] == batch["x"].shape[2:]
    elif isinstance(model, Generative):  # a GAN: the critic's score of each image; its generator's images join in
        assert out.shape == (4, 1)
        out = out + model.generator(torch.randn(4, model.latent_dim)).mean()
    elif isinstance(spec, MaskedTextSpec):  # a masked LM: token logits at every position (a TextSpec without classes)
        assert out.shape == (*batch["x"].shape, spec.vocab_size)
    elif isinstance(spec, (ImageSpec, TextSpec)):  # one row of class logits (or of a projection head) per example
        assert out.shape == (4, getattr(cfg, "proj_dim", spec.num_classes))
    elif isinstance(spec, TagSpec):  # given the tags y, each sentence's negative log-likelihood (every parameter)
        assert out.shape == (4,)
    elif isinstance(spec, TokenSpec):  # next-token logits at every position
        assert out.shape == (*batch["x"].shape, spec.vocab_size)
    else:  # sentence pairs: the next target token after each target position
        assert out.shape == (*batch["tgt"].shape, spec.tgt_vocab_size)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_variants_are_named_factories() -> None:
    """Depth is the variant's name, not an option: resnet34 has more blocks than resnet18, same config."""
    spec = models["resnet18"].meta["example"]
    sizes = {n: sum(p.numel() for p in build(n, section_from_dict(models, {"name": n}), spec).parameters())
             for n in ("resnet18", "resnet34")}
    assert sizes["resnet34"] > 1.8 * sizes["resnet18"]
    from nnlab.errors import UserError

    with pytest.raises(UserError, match="unknown config key 'model.blocks'"):
        from nnlab.config import load_config

        load_config("cifar10-resnet", ["model.blocks=[3,4,6,3]"])


def test_unknown_model() -> None:
    from nnlab.errors import UserError

    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        models["resnet-18"]


def test_classification_tta_views() -> None:
    """TTA averages the logits of the flipped (and shifted) views in the final evaluation only."""
    from nnlab.data import Batch
    from nnlab.tasks.classification import Classification, ClassificationConfig

    spec = ImageSpec(input_shape=(1, 4, 4), num_classes=2, classes=["a", "b"])
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
        b = Batch(x=x, y=y)
        assert torch.equal(both.eval_stats(net, b, final=False)["loss_sum"], plain.eval_stats(net, b)["loss_sum"])
        assert not torch.equal(flip.eval_stats(net, b)["loss_sum"], plain.eval_stats(net, b)["loss_sum"])


@pytest.mark.parametrize("mask", [False, True])
def test_attend_computes_cpu_bf16_attention_in_fp32(mask: bool) -> None:
    """Under CPU bf16 autocast, `attend` is SDPA of the same bf16 inputs in fp32, rounded back to bf16 (torch's bf16
    CPU kernels are slower); elsewhere it is SDPA itself."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8).to(torch.bfloat16) for _ in range(3))
    kw = {"attn_mask": torch.rand(2, 1, 5, 5) > 0.3} if mask else {"is_causal": True}
    if mask:
        kw["attn_mask"][..., 0] = True  # every query may see at least one key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, **kw)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(torch.bfloat16))
    x = [t.float() for t in (q, k, v)]
    assert torch.equal(attend(*x, **kw), F.scaled_dot_product_attention(*x, **kw))
