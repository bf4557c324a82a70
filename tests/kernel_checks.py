"""Helpers shared by the kernel tests (tests/test_rmsnorm*.py, test_swiglu.py, test_rope.py).

- ``bf16_round_to_nearest``: Triton's interpreter converts fp32 → bf16 by truncating the mantissa, while the GPU
  (and torch) round to nearest even. Truncation is a biased error (always towards zero) that adds up in fp32
  accumulations, so a correct kernel would look ~2× worse than torch in the interpreter. The fixture patches the
  interpreter's cast to round to nearest for the duration of a test; with compiled kernels it does nothing.
- ``assert_within_reference_error``: the tolerance rule of STYLE.md — against the fp32 reference, the kernel's
  error may be at most twice the low-precision reference's own error plus ``atol``.
- ``CountHostReads``: the torch calls that read a device value on the host (each a sync on CUDA), counted.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode


def _round_fp32_to_bf16(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(data, dtype=np.float32))
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)


@pytest.fixture(autouse=True)
def bf16_round_to_nearest(monkeypatch):
    from horizon_triton.kernels import tuning
    if not tuning.interpreting():
        return                                   # compiled kernels (TRITON_INTERPRET=0 on a GPU): nothing to patch
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_round_fp32_to_bf16(src.data), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def assert_within_reference_error(out: torch.Tensor, ref_lowp: torch.Tensor, ref_fp32: torch.Tensor,
                                  atol: float, name: str) -> None:
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    err = (out.float() - ref_fp32.float()).abs().max().item()
    err_ref = (ref_lowp.float() - ref_fp32.float()).abs().max().item()
    assert err <= 2 * err_ref + atol, (f"{name}: kernel error {err:.3g} > 2 × reference error {err_ref:.3g} "
                                       f"+ atol {atol:g}")


def dry_run_autotune(monkeypatch, tmp_path, module, candidates_attr: str, candidates: list[dict], shape: dict,
                     dev):
    """Runs ``module.autotune(shape)`` on ``dev`` (the interpreter on CPU, or the GPU) with ``candidates`` and a
    fake timer under which every later candidate looks faster; returns (rows, the stored tuning cache of this
    device)."""
    from horizon_triton.kernels import tuning

    monkeypatch.setattr(module, "AUTOTUNE_DEVICE", dev)
    if callable(getattr(module, candidates_attr)):
        monkeypatch.setattr(module, candidates_attr, lambda *_: candidates)
    else:
        monkeypatch.setattr(module, candidates_attr, candidates)
    fake_ms = iter(range(1000, 0, -1))
    monkeypatch.setattr(tuning, "time_ms", lambda fn, warmup=0, rep=0: (fn(), float(next(fake_ms)))[1])
    monkeypatch.setenv("HORIZON_TUNING_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(tuning, "_cache", None)
    rows = module.autotune(shape)
    monkeypatch.setattr(tuning, "_cache", None)                     # read back what was written to disk
    return rows, tuning._load()[tuning._device_name()]


class CountHostReads(TorchFunctionMode):
    """Inside ``with CountHostReads() as mode``: mode.reads lists the host-reading torch calls made, by name
    ("to" with a device too: a copy to the host is one, an upload is not; a cast to a dtype is not counted)."""
    HOST_READS = {"cpu", "to", "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        cast = name == "to" and not kwargs.get("device") and all(isinstance(a, torch.dtype) for a in args[1:])
        if name in self.HOST_READS and not cast:
            self.reads.append(name)
        return func(*args, **kwargs)
