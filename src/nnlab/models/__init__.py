"""Model families, one file each, registered by name as small factories, one per variant (timm-style):
`build(name, cfg, spec)` makes one.

A factory takes its family's config dataclass and the data's `Spec`, and returns an `nn.Module`; its
registration names an `example` spec, from which the registry tests draw inputs. Optional model methods,
typed as protocols: `init_from_data(batch)` (data-dependent initialisation, e.g. patch whitening; see
`InitFromData`), `param_groups()` (the model's own optimizer split; see `optim.HasParamGroups`) and
`flops_per_sample()` (for MFU; see `CountsFlops`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.image import ImageSpec
from ..registry import Registry

models = Registry("model")
CIFAR = ImageSpec(input_shape=(3, 32, 32), num_classes=10, classes=[str(i) for i in range(10)])
MNIST = ImageSpec(input_shape=(1, 28, 28), num_classes=10, classes=[str(i) for i in range(10)])


@runtime_checkable
class InitFromData(Protocol):
    def init_from_data(self, batch: Any) -> None: ...


@runtime_checkable
class CountsFlops(Protocol):
    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) of one example: the loop logs `perf/mfu` from it."""


def gpt2_init(m: nn.Module) -> None:
    """GPT-2's initialisation (for `module.apply`): weights of Linear and Embedding layers N(0, 0.02), biases 0."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def attend(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, **kw)`, computed in fp32 on a CPU under bf16 autocast: torch's
    bf16 CPU attention kernels run 2-3x slower than its fp32 ones (forward + backward at batch 48, 4 heads of
    32, 64 positions: 18.4 ms against 5.7 ms, torch 2.13 on AVX512-BF16), while the matmuls around them gain from
    bf16. Attention is a small share of the FLOPs, so the cast costs little; the output goes back to bf16."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)


def build(name: str, cfg: Any, spec: Any) -> nn.Module:
    return models[name].factory(cfg, spec)


from . import autoencoder, cnn, encoder, fastnet, fasttext, gan, gpt, mlp, resnet, rnn, simclr, tagger, transformer  # noqa: E402,F401  (registers them)
