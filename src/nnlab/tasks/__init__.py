"""Tasks own the objective and the metrics, so one training loop serves every family.

A task is built from its config dataclass and the data's `DataSpec` and answers:
- `step(model, batch) -> {"loss": tensor, **scalar extras}`: one training objective evaluation;
  the trainer backpropagates `loss` and logs every entry under `train/`.
- `eval_stats(model, batch, final=True) -> {name: tensor}`: additive sufficient statistics of one batch
  (counts, sums, a confusion matrix). The evaluator sums them over batches and processes (all-reduce), so
  metrics are exact under distributed evaluation. `final=False` marks the evaluations during training,
  where a task may skip costly extras (test-time augmentation) that only the reported figures need.
- `metrics(stats) -> {name: float}`: final metrics from the summed statistics.
- `predict(model, x) -> tensor`: model outputs for new inputs (probabilities for classifiers).

Optional, for tasks that take over the optimisation (a GAN's two players updated in turn):
- `optimizer(model, train_cfg) -> optim.Optimizers`: the task's own optimizers (each group's `lr` is the peak
  the schedule scales);
- `update(model, batch, optimizers) -> {"loss": tensor, **scalars}`: forward, backward and optimizer steps
  of one training step. The trainer still schedules learning rates, logs, checks for NaN, checkpoints every
  optimizer's state and resumes exactly.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

tasks = Registry("task")


def build(cfg: Any, spec: Any) -> Any:
    return tasks[cfg.name].factory(cfg, spec)


from . import classification  # noqa: E402,F401  (registers the tasks)
