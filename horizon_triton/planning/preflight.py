"""Preflight: refuse, within seconds and before allocating, what the machine cannot hold.

``check_engine`` (Engine.__init__) builds the engine's store layout and pipeline on the meta device (dryrun.py:
the same HostStore and build_pipeline, no memory) and compares what they will take with what is free: host RAM
(MemAvailable) for the store, whose pinned blocks take a power of two each, and the device for the staging slots
and gradient accumulators (on the CPU device those are host RAM too). ``check_step`` (before the first step of
each micro-batch shape) dry-runs that step and compares its device peak with the device's free memory.

Either raises MemoryError saying how many GiB are needed, how many are available and what to lower.
``TrainConfig(preflight=False)`` turns both off (tests, or experts who know MemAvailable undercounts, e.g.
memory a cgroup will reclaim).
"""
from __future__ import annotations

import torch

from ..devices.device import host_memory_info
from ..models.ops import select_backend

GiB = 2**30


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _device_free(device) -> int:
    """Bytes the device's tensors may still take: free memory, plus on CUDA what torch's allocator caches."""
    free = device.mem_get_info()[0]
    if device.type == "cuda":
        free += torch.cuda.memory_reserved(device.torch_device) - torch.cuda.memory_allocated(device.torch_device)
    return free


def check_engine(model_cfg, train_cfg, device) -> None:
    from .dryrun import fixed_device_bytes
    fixed, allocations = fixed_device_bytes(model_cfg, train_cfg, select_backend(device.type), device.mem_get_info()[1],
                                            device.pin_memory)
    store = sum(a.reserved_bytes for a in allocations)
    pinned = sum(a.reserved_bytes for a in allocations if a.pinned)
    on_host = device.type == "cpu"                   # the CPU device's tensors are host RAM as well
    need = store + (fixed if on_host else 0)
    available = host_memory_info()[0]
    if need > available:
        parts = f"the host store {_gib(store)}" + (f" ({_gib(pinned)} of it pinned, in power-of-two blocks)"
                                                   if pinned else "")
        if on_host:
            parts += f" and the CPU device's slots and accumulators {_gib(fixed)}"
        raise MemoryError(
            f"Engine needs {_gib(need)} of host memory for a {model_cfg.num_parameters() / 1e9:.2f}B-parameter "
            f"model: {parts}; this machine has {_gib(available)} available (MemAvailable). Use a machine with "
            f"more RAM or a smaller model (`horizon-triton plan` says what fits); TrainConfig(preflight=False) "
            f"skips this check")
    if not on_host:
        free = _device_free(device)
        if fixed > free:
            raise MemoryError(
                f"Engine needs {_gib(fixed)} on {device.torch_device} for {train_cfg.num_slots} staging slots and "
                f"the gradient accumulators (each sized to the largest layer), but {_gib(free)} are free: use "
                f"num_slots=2, free the device, or a card with more memory; TrainConfig(preflight=False) skips "
                f"this check")


def check_step(engine, mbs) -> None:
    """Dry-runs a step of these micro-batches' shapes; MemoryError if its device peak cannot fit."""
    from .dryrun import dry_run_shapes
    shapes = [mb.shape for mb in mbs]
    dry = dry_run_shapes(engine.model_cfg, engine.train_cfg, shapes, kernel_backend=engine.kernel_backend,
                         device_memory_bytes=engine.device.mem_get_info()[1],
                         pin_memory=engine.device.pin_memory,
                         world_size=engine.dist.world if engine.dist is not None else 1)   # the ids' union
    extra = dry.device_peak_bytes - dry.device_fixed_bytes     # the fixed part is allocated already
    free = _device_free(engine.device)
    if extra > free:
        tokens = sum(rows * seq for rows, seq in shapes)
        checkpoints = dry.device_held_at_peak - dry.device_fixed_bytes
        budget = engine.train_cfg.checkpoint_budget_bytes
        raise MemoryError(
            f"a step of {len(shapes)} micro-batch(es) of {' + '.join(f'{r}x{s}' for r, s in shapes)} tokens "
            f"({tokens:,} in all) needs {_gib(dry.device_peak_bytes)} on {engine.device.torch_device} at its "
            f"peak (slots and accumulators {_gib(dry.device_fixed_bytes)}, activation checkpoints and boundary "
            f"activations {_gib(checkpoints)}, the layer's working set {_gib(dry.device_peak_bytes - dry.device_held_at_peak)}) "
            f"but {_gib(free + dry.device_fixed_bytes)} are available: lower the tokens per micro-batch (rows or "
            f"sequence length; more grad_accum_steps keep the tokens per step), or "
            + ("set checkpoint_budget_bytes to keep fewer checkpoints on the device (the rest go to host memory)"
               if budget is None else f"lower checkpoint_budget_bytes (now {budget:,})")
            + "; TrainConfig(preflight=False) skips this check")
