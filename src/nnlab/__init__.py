"""nnlab: a deep-learning workbench on PyTorch. One CLI, one run format, one training loop per kind of learning.

    import nnlab
    run = nnlab.train("mnist-cnn", train={"epochs": 3}); run.final["test/acc"]
    run = nnlab.load_run(run.path); run.evaluate("test"); run.predict(["digit.png"])

Registries, for plugging in your own entries (`@models.register("mynet", config=MyConfig, example=spec)`):
`nnlab.data.datasets`, `nnlab.data.specs`, `nnlab.models.models`, `nnlab.tasks.tasks`, `nnlab.optim.optimizers`,
`nnlab.registry.loops`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"
__all__ = ["train", "resume", "load_run", "load_model", "load_config", "__version__"]

_LAZY = {"train": "session", "resume": "session", "load_run": "infer", "load_model": "infer", "load_config": "config"}


def __getattr__(name: str) -> Any:  # lazy: `import nnlab` stays instant, torch loads on first use
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nnlab' has no attribute {name!r}")
