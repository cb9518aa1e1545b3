"""nnlab: a deep-learning workbench on PyTorch. One CLI, one run format, one training loop.

    import nnlab
    run_dir = nnlab.train("mnist-cnn", train={"epochs": 3})
    run = nnlab.load_run(run_dir); run.summary["final"]; run.predict(["digit.png"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "resume", "load_run", "load_model", "load_config", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import nnlab` stays instant, torch loads on first use
    if name in ("train", "resume"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("load_run", "load_model"):
        from . import infer

        return getattr(infer, name)
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'nnlab' has no attribute {name!r}")
