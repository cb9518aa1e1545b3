"""Evaluation shared by the trainer and `nnlab eval`: sum a task's statistics over batches and
processes, then turn them into metrics."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from . import dist


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16 matmul
    (AVX512-BF16 / AMX: ~4x fp32 there), fp32 elsewhere (emulated bf16 is ~10x slower)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        with contextlib.suppress(Exception):
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return "bf16"
    return "fp32"


@torch.no_grad()
def evaluate(model: nn.Module, task: Any, loader: Any, env: dist.Env, precision: str = "fp32",
             final: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of `model` on every batch of `loader` (each process takes its shard); `final=False` for
    the evaluations during training. The task's tensor statistics are summed over batches and processes
    (exact), its list statistics (per-example outputs) concatenated and gathered from every process."""
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    lists: dict[str, list] = {}
    for batch in loader.epoch(0):
        with autocast(env.device, precision):
            for k, v in task.eval_stats(model, batch.to(env.device), final=final).items():
                if isinstance(v, list):
                    lists.setdefault(k, []).extend(v)
                else:
                    sums[k] = sums[k] + v if k in sums else v.clone()
    dist.all_reduce(sums, env)
    gathered = {k: [x for part in dist.gather_objects(v, env) for x in part] for k, v in lists.items()}
    model.train(was_training)
    stats = {k: v.cpu() for k, v in sums.items()} | gathered
    return task.metrics(stats), stats
