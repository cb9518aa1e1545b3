"""Device choice and torch.distributed plumbing (torchrun: gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"bad value for config key 'train.device': '{name}' (use auto, cpu, cuda, cuda:N or mps)"
                        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is available; use train.device=auto or cpu")
    return device


def setup(device: str) -> Env:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world == 1:
        return Env(dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(dev, rank, world, local)


def all_reduce(tensors: dict[str, torch.Tensor], env: Env, op: str = "sum") -> dict[str, torch.Tensor]:
    """Reduce every tensor in place across processes: op sum | min."""
    if env.world > 1:
        for t in tensors.values():
            dist.all_reduce(t, dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return tensors


def broadcast_buffers(module: torch.nn.Module, env: Env) -> None:
    """Rank 0's buffers (batch-norm statistics) everywhere: under DDP each rank updates its own copy from
    its shard after the forward, so evaluations and checkpoints use rank 0's, as DDP does in training."""
    if env.world > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def gather_objects(obj, env: Env) -> list:
    if env.world == 1:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: Env):
    if env.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


def cleanup(env: Env) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
