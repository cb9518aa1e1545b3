"""Evaluation shared by the trainer and `nnlab eval`: sum a task's statistics over batches and
processes, then turn them into metrics."""

from __future__ import annotations

import contextlib
import functools
import time
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
    """`auto`: bf16 on GPUs that support it (else fp16); on a CPU, bf16 where oneDNN reports native bf16
    (AVX512-BF16 / AMX) and a measured bf16 matmul is at least 1.2x the fp32 one (AMX: ~4x; some AVX512-BF16
    machines run bf16 at half the fp32 rate), else fp32 (emulated bf16 is ~10x slower)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        with contextlib.suppress(Exception):
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                fast = peak_flops(device, "bf16") >= 1.2 * peak_flops(device, "fp32")
                return "bf16" if fast else "fp32"
    return "fp32"


@functools.cache
def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """This machine's matmul peak (FLOP/s) at `dtype`: the best of repeated n x n matmuls (2n^3 FLOP each)
    over about `seconds`, on the threads torch uses now. Measured once per process; the denominator of MFU."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: thread pool, kernel selection
        a @ b
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> float:
    """The matmul peak at a precision: 1024^2 matmuls for 0.2 s on a CPU (bf16 may be emulated there; the same
    measurement serves `precision=auto` and MFU, once per process), 4096^2 for 0.5 s on a GPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu":
        return matmul_flops(device, dtype, 1024, 0.2)
    return matmul_flops(device, dtype, 4096, 0.5)


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
