"""Op dispatch: the one place that decides which implementation of each op the layer template runs.

Backends
- ``torch``            on CPU the references in kernels/reference.py (hand-written backward, no autograd), but for
                       the attention: aten's CPU flash attention through the library path's segment layout
                       (CPU_LIBRARY_OPS); on CUDA the library path, kernels/library.py (PyTorch's flash
                       attention, cuBLAS and the MoE experts' torch._grouped_mm called directly, same
                       signatures): the always-correct baseline
- ``triton``           the Triton kernels of kernels/<family>.py (the CUDA path)
- ``triton-interpret`` the same kernels run by Triton's interpreter on CPU (slow; for tests)

Default: ``triton`` on CUDA, ``torch`` on CPU. ``HORIZON_KERNELS=torch|triton|interpret`` overrides it.
Plain matmuls (o_proj, down_proj, the LoRA adapters' rank-r products) stay torch matmuls on every backend: cuBLAS
is already the fastest kernel.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from types import SimpleNamespace

from horizon_triton.kernels import library, reference

log = logging.getLogger("horizon_triton")

# op name -> kernel family module that implements it on the Triton backends
KERNEL_FAMILY = {
    "rmsnorm_forward": "rmsnorm", "rmsnorm_backward": "rmsnorm",
    "rmsnorm_matmul_forward": "rmsnorm_matmul", "rmsnorm_matmul_backward": "rmsnorm_matmul",
    "rope_forward_": "rope", "rope_backward_": "rope",
    "swiglu_forward": "swiglu", "swiglu_backward": "swiglu",
    "attention_forward": "attention", "attention_backward": "attention",
    "linear_cross_entropy": "cross_entropy",
    "cross_entropy_chunk_stats_": "cross_entropy", "cross_entropy_chunk_backward": "cross_entropy",
    "moe_softmax_topk_forward": "moe_routing", "moe_softmax_topk_backward": "moe_routing",
    "moe_sigmoid_topk_forward": "moe_routing", "moe_sigmoid_topk_backward": "moe_routing",
    "moe_permute": "moe_routing",
    "moe_gate_up_forward": "moe_experts", "moe_gate_up_backward": "moe_experts",
    "moe_down_forward": "moe_experts", "moe_down_backward": "moe_experts",
    "moe_combine_forward": "moe_experts", "moe_combine_backward": "moe_experts",
    "clamped_swiglu_forward": "clamped_swiglu", "clamped_swiglu_backward": "clamped_swiglu",
}
MOE_FAMILIES = ("moe_routing", "moe_experts", "clamped_swiglu")      # used by MoE layers only
TORCH_ONLY = ("linear_forward", "linear_backward", "cross_entropy_chunk_loss", "lora_forward", "lora_backward")
BACKENDS = {"torch": "torch", "triton": "triton", "interpret": "triton-interpret"}
# what the torch backend takes from the library path on CPU: the reference attention is O(S²) in time and memory
# (scores, exp and masks over every pair), PyTorch's CPU flash attention skips the blocks causality excludes.
# Not the MoE experts' grouped GEMMs: on CPU torch._grouped_mm is itself a loop of GEMMs, and its weight gradient a
# product added afterwards (the reference adds in place, addmm), so it measured no faster than the reference loop
# (equal at 16 experts, 2× slower at 64; forward and input gradients alike, weight gradients slower)
CPU_LIBRARY_OPS = ("attention_forward", "attention_backward")


def select_backend(device_type: str) -> str:
    choice = os.environ.get("HORIZON_KERNELS")
    if choice is None:
        return "triton" if device_type == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"HORIZON_KERNELS={choice!r}: choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[choice]
    if backend == "triton" and device_type != "cuda":
        raise ValueError("HORIZON_KERNELS=triton needs a CUDA device; use HORIZON_KERNELS=interpret to run the "
                         "Triton kernels on CPU through the interpreter")
    if backend == "triton-interpret" and device_type == "cuda":
        raise ValueError("HORIZON_KERNELS=interpret runs kernels on CPU tensors; use device='cpu'")
    return backend


def load_ops(backend: str, device_type: str = "cpu") -> SimpleNamespace:
    """A namespace with one function per op, all with the signatures of kernels/reference.py."""
    names = list(KERNEL_FAMILY) + list(TORCH_ONLY)
    if backend == "torch":
        if device_type != "cuda":
            return SimpleNamespace(**{name: getattr(library if name in CPU_LIBRARY_OPS else reference, name)
                                      for name in names})
        # the library path replaces what PyTorch's own kernels do better; every other op is the reference
        return SimpleNamespace(**{name: getattr(library, name, None) or getattr(reference, name) for name in names})
    if backend == "triton-interpret":
        _enter_interpreter()
    ops = {name: getattr(reference, name) for name in TORCH_ONLY}
    for name, family in KERNEL_FAMILY.items():
        module = importlib.import_module(f"horizon_triton.kernels.{family}")
        ops[name] = getattr(module, name)
    return SimpleNamespace(**ops)


def attention_refusal(ops, head_dim: int, dtype) -> str | None:
    """Why ``ops``' attention does not take this head dim and dtype (None: it does). The Triton kernels take head
    dims 32 to 256 in steps of 16; the library path and the references take any (the library path itself falls
    back to the reference where PyTorch's flash attention does not apply)."""
    attention_forward = ops.attention_forward
    if getattr(attention_forward, "__module__", None) != "horizon_triton.kernels.attention":
        return None
    return sys.modules[attention_forward.__module__].unsupported(head_dim, dtype)


def _enter_interpreter() -> None:
    # triton.jit decides between compiled and interpreted functions when a kernel module is imported
    if os.environ.get("TRITON_INTERPRET") != "1":
        compiled = [f for f in set(KERNEL_FAMILY.values()) if f"horizon_triton.kernels.{f}" in sys.modules]
        if compiled:
            raise RuntimeError(f"kernel modules {compiled} were imported before HORIZON_KERNELS=interpret took effect; "
                               "set TRITON_INTERPRET=1 before importing them")
        os.environ["TRITON_INTERPRET"] = "1"
