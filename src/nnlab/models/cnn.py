"""A small VGG-style CNN: stages of [conv3x3 -> BN -> ReLU] x 2 -> max-pool, then an MLP head."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from . import MNIST, models


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])  # conv width of each stage (one pool each)
    convs_per_stage: int = 2  # 3x3 convolutions in each stage
    hidden: int = 256  # width of the hidden layer of the head
    dropout: float = 0.25  # dropout before each layer of the head
    batch_norm: bool = True  # BatchNorm after each convolution


def conv_bn(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn), *([nn.BatchNorm2d(c_out)] if bn else []),
            nn.ReLU(inplace=True)]


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for width in cfg.channels:
            for _ in range(cfg.convs_per_stage):
                layers += conv_bn(c, width, cfg.batch_norm)
                c = width
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)  # (B, C, H, W) -> (B, c, h, w)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c * h * w, cfg.hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@models.register("cnn", config=CNNConfig, example=MNIST)
def cnn(cfg: CNNConfig, spec) -> nn.Module:
    """Small VGG-style CNN for small images (MNIST, digits)."""
    if min(spec.input_shape[1:]) < 2 ** len(cfg.channels):
        from ..errors import UserError

        raise UserError(f"model.channels has {len(cfg.channels)} stages, each halving the image, but the "
                        f"images are only {spec.input_shape[1]}x{spec.input_shape[2]}: use fewer stages")
    return CNN(cfg, spec.input_shape, spec.num_classes)
