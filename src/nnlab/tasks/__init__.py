"""Tasks own the objective, the metrics and the outputs, so one training loop serves every family.

A task is built from its config dataclass and the data's `Spec`; `Task` is the protocol it answers and
`TaskBase` gives the optional parts their defaults. The loop never looks inside a batch: the task does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..errors import UserError
from ..registry import Registry

tasks = Registry("task")


@runtime_checkable
class Task(Protocol):
    monitor: str  # the metric that picks the best checkpoint by default, e.g. "acc" (as f"{split}/acc")

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of `metric` (a name without the split, e.g. "loss") is better."""

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """The training objective on one (micro-)batch: {"loss": tensor, **scalar extras}, logged as train/*."""

    def eval_stats(self, model: nn.Module, batch: Any, final: bool = True) -> dict[str, Tensor | list]:
        """Statistics of one batch. Tensors are summed over batches and processes (counts, sums, a confusion
        matrix: exact under DDP); lists (per-example outputs, e.g. scores and targets for a ranking metric)
        are concatenated and gathered from every process. `final=False` marks evaluations during training,
        where a task may skip costly extras (test-time augmentation)."""

    def metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        """Metrics from the statistics of a whole split."""

    def describe(self, stats: dict[str, Any]) -> str:
        """Text about one split's statistics beyond the metrics (a per-class table), printed by `nnlab eval`."""

    def summary(self, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """JSON extras for summary.json['task'] from each final split's statistics (e.g. confusion matrices)."""

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        """Markdown lines of the task's report sections; may write plots into folder/plots/."""

    def optimizers(self, model: nn.Module) -> Any:
        """None (the loop builds the `optim` section's optimizer), or the task's own `Optimizers` (a GAN:
        one per player); then `update` makes each training step."""

    def update(self, model: nn.Module, batch: Any, opt: Any, stepper: Any) -> dict[str, Tensor]:
        """A whole training step for a task with its own optimizers: forward, `stepper.backward(loss)`,
        `stepper.step(i)` (gradients averaged over processes, clipped, optimizer i stepped, its grads zeroed)."""

    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        """Files written after every evaluation during training (text samples, sample grids), on the main
        process, with the weights just evaluated; `data` is the run's dataset (e.g. sentences to translate)."""

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        """One row per raw input (file path or text line): the task's output, or {"error": message}."""


class TaskBase:
    """Defaults for the optional parts of `Task`."""

    monitor = "loss"

    def higher_is_better(self, metric: str) -> bool:
        return metric != "loss" and not metric.endswith(("loss", "nll", "ppl", "bpc", "error"))

    def describe(self, stats: dict[str, Any]) -> str:
        return ""

    def summary(self, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {}

    def report(self, folder: Path, summary: dict[str, Any], model: nn.Module | None, data: Any) -> list[str]:
        return []

    def optimizers(self, model: nn.Module) -> Any:
        return None

    def update(self, model: nn.Module, batch: Any, opt: Any, stepper: Any) -> dict[str, Tensor]:
        raise NotImplementedError("a task that returns its own optimizers makes the update itself")

    def artifacts(self, model: nn.Module, folder: Path, step: int, data: Any = None) -> None:
        return None

    def predict(self, model: nn.Module, inputs: Sequence[str], top: int = 1) -> list[dict[str, Any]]:
        raise UserError(f"the task '{type(self).__name__}' has no predict")


def build(cfg: Any, spec: Any) -> Task:
    task = tasks[cfg.name].factory(cfg, spec)
    if not isinstance(task, Task):
        names = ("monitor", "higher_is_better", "step", "eval_stats", "metrics", "describe", "summary", "report",
                 "optimizers", "update", "artifacts", "predict")
        missing = [m for m in names if not hasattr(task, m)]
        raise TypeError(f"task '{cfg.name}' lacks {', '.join(missing)} of the Task protocol (subclass TaskBase)")
    return task


from . import autoencoder, classification, contrastive, gan, generative, lm, mlm, seq2seq, tagging  # noqa: E402,F401  (registers the tasks)
