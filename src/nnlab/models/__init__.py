"""Model families, one file each, registered by name: `build(name, cfg, spec)` makes one.

A factory takes its family's config dataclass and the `DataSpec` of the data, and returns an
`nn.Module`. Optional hooks the trainer uses when present: `init_from_data(x)` (data-dependent
initialisation, e.g. patch whitening) and `param_groups()` (optimizer split).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry

models = Registry("model")


def build(name: str, cfg: Any, spec: Any) -> nn.Module:
    return models[name].factory(cfg, spec)


from . import cnn, fastnet, mlp, resnet  # noqa: E402,F401  (registers the families)
