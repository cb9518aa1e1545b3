"""Multi-layer perceptron: flatten -> [Linear -> norm? -> GELU -> dropout] x N -> Linear."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from . import MNIST, models


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # width of each hidden layer
    dropout: float = 0.1  # dropout after each hidden activation
    layer_norm: bool = False  # LayerNorm before each activation (no batch statistics: safe for DDP parity)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, in_features: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in cfg.hidden:
            layers.append(nn.Linear(width, h))
            if cfg.layer_norm:
                layers.append(nn.LayerNorm(h))
            layers += [nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, *input_shape) -> (B, num_classes)
        return self.head(self.body(x))


@models.register("mlp", config=MLPConfig, example=MNIST)
def mlp(cfg: MLPConfig, spec) -> nn.Module:
    """MLP classifier over flattened inputs."""
    return MLP(cfg, math.prod(spec.input_shape), spec.num_classes)
