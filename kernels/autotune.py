"""Per-kernel autotune entry point.

    python -m horizon_triton.kernels.autotune <kernel> [--shape NAME=VALUE ...]

Sweeps the kernel's candidate configurations on the current GPU for each shape, prints the best per shape
with its TFLOPS or GB/s, and stores the winner (kernels/tuning.py) where the launch function picks it up next
time. Each kernel module provides ``autotune(shape: dict | None) -> list[dict]``; each returned row has
``shape``, ``config``, ``ms`` and ``throughput`` (a string with its unit).
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

KERNELS = {
    "rmsnorm": "horizon_triton.kernels.rmsnorm",
    "rmsnorm_matmul": "horizon_triton.kernels.rmsnorm_matmul",
    "attention": "horizon_triton.kernels.attention",
    "cross_entropy": "horizon_triton.kernels.cross_entropy",
    "swiglu": "horizon_triton.kernels.swiglu",
    "rope": "horizon_triton.kernels.rope",
    "moe_routing": "horizon_triton.kernels.moe_routing",
    "moe_experts": "horizon_triton.kernels.moe_experts",
    "clamped_swiglu": "horizon_triton.kernels.clamped_swiglu",
}


def _parse_shape(items: list[str]) -> dict | None:
    if not items:
        return None
    shape = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--shape takes NAME=VALUE, got {item!r}")
        shape[name] = int(value)
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horizon_triton.kernels.autotune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--shape", nargs="*", default=[], metavar="NAME=VALUE",
                        help="one shape to tune instead of the kernel's default sweep, e.g. --shape T=8192 H=4096")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"autotune {args.kernel}: needs a CUDA GPU (none visible); nothing was tuned.", file=sys.stderr)
        return 2
    module = importlib.import_module(KERNELS[args.kernel])
    rows = module.autotune(_parse_shape(args.shape))
    print(f"{args.kernel} on {torch.cuda.get_device_name()}:")
    for row in rows:
        print(f"  {row['shape']}: best {row['config']}  {row['ms']:.3f} ms  {row['throughput']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
