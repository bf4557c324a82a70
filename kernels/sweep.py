"""The sweep every ``autotune(shape)`` of rmsnorm, rmsnorm_matmul, swiglu and rope runs: check each candidate
config against the reference, time the ones that compute the right thing, keep the fastest.

A config that does not compile (too much shared memory, too many registers) or computes a wrong result on
this device is skipped with a printed line, never timed or stored.
"""
from __future__ import annotations

import torch

from . import tuning


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / (1 + max |ref|): scale-free, and robust to a reference with zeros."""
    return ((out.float() - ref.float()).abs().max() / (1 + ref.float().abs().max())).item()


def fastest(label: str, candidates: list[dict], run, check, tol: float = 2e-2) -> tuple[dict, float]:
    """(config, ms) of the fastest candidate whose ``check(cfg)`` (an error figure) is within ``tol``.

    ``run(cfg)`` launches the kernel with that config; ``check(cfg)`` runs it on the tuning inputs and returns
    its error against the reference (bf16 kernels round differently, so tol allows a few bf16 ulps, while a
    bad tile edge or a dropped mask shows up as O(1))."""
    best = None
    for cfg in candidates:
        try:
            err = check(cfg)
        except Exception as exc:  # noqa: BLE001  (compile failure: out of shared memory or registers)
            print(f"  {label}: skipping {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if not err <= tol:
            print(f"  {label}: skipping {cfg}: wrong result on this device (error {err:.3g} > {tol:g})")
            continue
        ms = tuning.time_ms(lambda: run(cfg))
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        raise RuntimeError(f"{label}: no candidate config compiled and computed the right result")
    return best
