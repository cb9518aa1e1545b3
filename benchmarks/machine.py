"""The machine line every figure in docs/benchmarks.md names: fp32 and bf16 matmul GFLOP/s on all cores,
and whether bf16 is native (oneDNN's AVX512-BF16/AMX check, the one `train.precision=auto` uses).

    .venv/bin/python benchmarks/machine.py            # one line, also as JSON with --json

Budgets in the issues are stated for a reference machine (2 cores, native bf16: about 190 GFLOP/s fp32
and 840 bf16); scale a budget by the ratio of this machine's rate to the reference's at the precision
a run uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform

import torch

from nnlab.evaluate import matmul_flops

REFERENCE = {"fp32": 190.0, "bf16": 840.0}  # GFLOP/s of the reference machine (2 cores, AVX512-BF16)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best of repeated n x n matmuls over about `seconds` (nnlab's own measurement, the denominator of MFU)."""
    return matmul_flops(torch.device("cpu"), dtype, n, seconds) / 1e9


def native_bf16() -> bool:
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure() -> dict:
    native = native_bf16()
    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16, n=2048 if native else 512, seconds=2.0 if native else 1.0)
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
            "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1),
            "scale_fp32": round(fp32 / REFERENCE["fp32"], 3), "scale_bf16": round(bf16 / REFERENCE["bf16"], 3),
            "torch": torch.__version__}


def line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['capability']}, "
            f"bf16 {'native' if m['native_bf16'] else 'emulated'}: fp32 {m['fp32_gflops']:.0f} GFLOP/s, "
            f"bf16 {m['bf16_gflops']:.0f} GFLOP/s (x{m['scale_fp32']:.2f} / x{m['scale_bf16']:.2f} the reference), "
            f"torch {m['torch']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")
    args = p.parse_args()
    m = measure()
    print(json.dumps(m) if args.json else line(m))


if __name__ == "__main__":
    main()
