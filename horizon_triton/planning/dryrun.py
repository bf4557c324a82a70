"""The dry run: the real engine at full size on PyTorch's meta device (shapes and dtypes, no memory, no arithmetic).

On a ``MetaDevice``, schedule/build.py builds the same HostStore layout and the same pipeline as the Engine
does, and ``run_step`` then runs the real scheduler and layer template on meta micro-batches made by the
engine's own batch preparation, data/batch.prepare (every token of the step a distinct id, up to the vocabulary:
the most embedding rows a step can gather). Nothing here models the engine a second time; the answers are what
the engine's own accounting sees:

- host bytes: ``store.allocations``, each at what it really takes (store.host_block_bytes: pinned blocks round
  up to a power of two), plus the host buffers the step makes (``device.host_empty``: offloaded activation
  checkpoints, the gathered embedding rows and their gradient) at their peak;
- device bytes: every device tensor the run creates, live from its allocation until its storage dies (weakref
  finalizers on storages, as the caching allocator frees; rounded to its 512-byte blocks), tensors retained for
  another stream held until that stream's event is waited for, or a copy stream's until the next compute task
  has run (MetaDevice.retain). DeviceMeter's own peak, the ``device_peak_bytes`` of fit()'s history, is
  reported beside it;
- bus bytes: DeviceMeter's h2d/d2h counters, which every copy site of the scheduler feeds;
- FLOPs and device-memory bytes by kind, per stream task (MetaDevice.timeline), for the step-time model of
  plan.py: torch ops are counted from their shapes by ``OpCounter``, a TorchDispatchMode (GEMMs 2·M·N·K by
  operand dtype; any other op one FLOP per element and its inputs' and outputs' bytes); the Triton kernels,
  which cannot run on meta tensors, are stood in for by kernel_models.TritonModels, which allocate what their
  launch functions allocate and count the kernels' work from the same shapes.

Known gaps: the host thread is assumed never to run ahead of the GPU (a retained tensor is freed as soon as its
copy is known done, where the caching allocator may hold it longer); the batch's own host->device copy (ids,
labels) is not counted; kernels are costed by the useful work of their tiles, not the masked-out part; on the
CPU device, the fp32 operand chunks of matmul_accumulate_ (16 MB each) are not counted as memory. A generic
model (models/generic) records its layer inputs (masks, rotary tables) on the CPU from the batch's host layout
and holds them as meta tensors of their sizes: their memory is counted, the work of making them is not; its
attention is costed as CUDA's fused sdpa kernels (or the model's eager attention, where it needs it: sinks);
a layer the model computes with a torch reference where the GPU would run a library kernel (Qwen3.5's gated
delta rule without flash-linear-attention) is counted as that reference.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ModelConfig, TrainConfig
from ..devices.device import MetaDevice
from .kernel_models import causal_pairs, meta_ops, nbytes
from ..data.batch import prepare as prepare_batch
from ..data.batch import to_device
from ..data.pairs import PreferenceBatch
from ..objectives.preference import DPOHead
from ..models.family import is_generic
from ..models.generic.skeleton import skeleton
from ..schedule.build import build_step_pipeline, build_store
from ..schedule.scheduler import run_step
from ..host.store import HostStore, host_block_bytes

aten = torch.ops.aten
DEVICE_BLOCK = 512                     # the CUDA caching allocator's allocation granularity
GEMMS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_}
# fused attention (the generic template's sdpa on meta: models/generic/attention.FusedAttentionOnMeta) ->
# (where is_causal is among the positional arguments, where the query is, whether it is the backward)
FUSED_ATTENTION = {aten._scaled_dot_product_flash_attention: (4, 0, False),
                   aten._scaled_dot_product_efficient_attention: (6, 0, False),
                   aten._scaled_dot_product_flash_attention_backward: (11, 1, True),
                   aten._scaled_dot_product_efficient_attention_backward: (11, 1, True)}
FREE_OPS = {aten.empty, aten.empty_strided, aten.empty_like, aten.detach, aten.alias, aten._unsafe_view,
            aten.lift_fresh, aten.lift_fresh_copy}


def meta_addmm_dtype_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, *,
                         out: torch.Tensor, beta=1, alpha=1) -> torch.Tensor:
    """``addmm(acc, a, b, out_dtype=..., out=out)`` on meta tensors: checks what CUDA checks and returns ``out``.

    Never calls PyTorch's own meta decomposition: torch 2.11's binds ``out_dtype`` as ``beta`` and raises TypeError,
    which would stop every dry run (preflight, plan) before its first step."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise RuntimeError(f"addmm: mat1 {tuple(a.shape)} and mat2 {tuple(b.shape)} cannot be multiplied")
    if a.dtype != b.dtype:
        raise RuntimeError(f"addmm: mat1 and mat2 must have one dtype, got {a.dtype} and {b.dtype}")
    if out.dtype != out_dtype or tuple(out.shape) != (a.shape[0], b.shape[1]) or acc.shape != out.shape:
        raise RuntimeError(f"addmm: out {out.dtype}{tuple(out.shape)} for {out_dtype} [{a.shape[0]}, {b.shape[1]}]")
    return out


def grouped_gemm_flops(a: torch.Tensor, b: torch.Tensor) -> float:
    """FLOPs of ``_grouped_mm(a, b, offs)``: 2·M·K·N over all groups, whatever the groups' sizes (the offsets
    split one of the dimensions into the groups; an MoE's expert GEMMs cost the same under any routing)."""
    if a.dim() == 2 and b.dim() == 3:              # tokens [S, K] by experts [E, K, N]: S split
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:              # [M, S] by [S, N]: S split (a weight gradient per group)
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if a.dim() == 3 and b.dim() == 2:              # [E, M, K] by [K, N]: N split
        return 2.0 * a.shape[1] * a.shape[2] * b.shape[1]
    return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]     # batched


def fused_attention_flops(func, args, kwargs) -> float:
    """FLOPs of a fused attention kernel (flash or memory-efficient, forward or backward): 4·D per (query, key)
    pair each head computes, the causal ones only where the kernel skips the others (is_causal), the whole
    square where a mask is given (the memory-efficient kernel adds it as a bias to every score); the backward
    2.5 times the forward (as kernel_models counts our own attention kernels)."""
    causal_at, query_at, backward = FUSED_ATTENTION[func.overloadpacket]
    q, k = args[query_at], args[query_at + 1]
    B, heads, S, D = q.shape
    causal = args[causal_at] if len(args) > causal_at else kwargs.get("is_causal", False)
    pairs = causal_pairs(S, None) if causal else S * k.shape[2]
    return 4.0 * D * B * heads * pairs * (2.5 if backward else 1.0)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


# ------------------------------------------------------------------------------------------------------------
# counting: memory live on the device and on the host, work per stream task
# ------------------------------------------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Sees every op on meta tensors. New storages are device memory, unless HostStore.alloc_kind or
    MetaDevice.host_empty made them (host memory); their bytes stay counted until the storage dies. Each op's
    work goes to the running task of the device's timeline; a copy from or to a host storage is a bus transfer."""

    def __init__(self, dev: MetaDevice):
        super().__init__()
        self.dev = dev
        self.device_live = 0
        self.device_peak = 0
        self.host_live = 0           # host buffers made during the step (dev.host_empty), at reserved size
        self.host_peak = 0
        self.workspace_live = 0      # the part of device_live that kernel models allocated as workspace
        self.held_at_peak = 0        # DeviceMeter.held at the moment of device_peak
        self.workspace_at_peak = 0
        self.meter = None            # set once the pipeline exists
        self._sizes: dict[int, tuple[str, int]] = {}     # storage id -> ("device"|"host"|"store"|"workspace", bytes)
        self._allocating_workspace = False
        self._store_code = HostStore.alloc_kind.__code__

    # ---- memory ----------------------------------------------------------------------------------------
    def _made_by_store(self) -> bool:
        frame = sys._getframe(2)
        for _ in range(12):
            if frame is None:
                return False
            if frame.f_code is self._store_code:
                return True
            frame = frame.f_back
        return False

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        n = storage.nbytes()
        if self.dev.host_allocating:
            where, n = "host", host_block_bytes(n, self.dev.pin_memory)
            self.host_live += n
            self.host_peak = max(self.host_peak, self.host_live)
        elif self._made_by_store():
            where = "store"           # counted from store.allocations, not here
        else:
            where = "workspace" if self._allocating_workspace else "device"
            n = -(-n // DEVICE_BLOCK) * DEVICE_BLOCK
            self.device_live += n
            self.workspace_live += n if where == "workspace" else 0
            self.dev.allocated = self.device_live
            if self.device_live > self.device_peak:
                self.device_peak = self.device_live
                self.held_at_peak = self.meter.held if self.meter is not None else 0
                self.workspace_at_peak = self.workspace_live
        self._sizes[key] = (where, n)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        where, n = self._sizes.pop(key)
        if where == "host":
            self.host_live -= n
        elif where != "store":
            self.device_live -= n
            self.workspace_live -= n if where == "workspace" else 0
            self.dev.allocated = self.device_live

    def untrack(self, tensors) -> None:
        """Counts these tensors' storages as no memory from now on (tensors that are meta in a real run too)."""
        for t in tensors:
            key = t.untyped_storage()._cdata
            if self._sizes.get(key, ("store",))[0] != "store":
                self._free(key)
                self._sizes[key] = ("store", 0)

    def is_host(self, t: torch.Tensor) -> bool:
        return self._sizes.get(t.untyped_storage()._cdata, ("device",))[0] in ("host", "store")

    def workspace(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A kernel's scratch buffer (kernel models allocate through this, so the peak can say how much is)."""
        self._allocating_workspace = True
        try:
            return torch.empty(shape, dtype=dtype, device=device)
        finally:
            self._allocating_workspace = False

    # ---- work ------------------------------------------------------------------------------------------
    def count(self, kind: str, flops: float, nbytes: int) -> None:
        costs = self.dev.task_costs()
        entry = costs.setdefault(kind, [0.0, 0])
        entry[0] += flops
        entry[1] += nbytes

    def _cost(self, func, args, kwargs, out) -> None:
        packet = func.overloadpacket
        if packet in FREE_OPS or func.is_view:
            return
        inputs = [t for t in _tensors((args, kwargs)) if t.device.type == "meta"]
        outputs = [t for t in _tensors(out) if t.device.type == "meta"]
        if packet is aten.copy_:
            dst, src = args[0], args[1]
            # a real CPU tensor (host indices made from the batch) is host memory too
            src_host, dst_host = (t.device.type != "meta" or self.is_host(t) for t in (src, dst))
            if src_host != dst_host:
                self.count("d2h" if dst_host else "h2d", 0, nbytes(src))
                return
        if packet is aten._grouped_mm:
            a, b = args[0], args[1]
            self.count(f"gemm_{str(a.dtype).removeprefix('torch.')}", grouped_gemm_flops(a, b),
                       nbytes(*inputs, *outputs))
            return
        if packet in FUSED_ATTENTION:
            kind = "attention_bwd" if FUSED_ATTENTION[packet][2] else "attention_fwd"
            self.count(kind, fused_attention_flops(func, args, kwargs), nbytes(*inputs, *outputs))
            return
        if packet in GEMMS:
            a, b = (args[1], args[2]) if packet in (aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_) \
                else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            flops = 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            dtype = a.dtype
            if func is aten.addmm.dtype_out and not self.dev.pin_memory:
                # reference.matmul_accumulate_ takes its CUDA path on meta tensors; the CPU device it stands for
                # has no mixed-dtype GEMM and runs fp32 GEMMs over fp32 copies of operand chunks
                dtype = out.dtype
            self.count(f"gemm_{str(dtype).removeprefix('torch.')}", flops, nbytes(*inputs, *outputs))
            return
        if not inputs and not outputs:
            return
        mutated = func._schema.is_mutable
        if not mutated and outputs and inputs and all(
                o.untyped_storage()._cdata in {i.untyped_storage()._cdata for i in inputs} for o in outputs):
            return                    # an alias of an input
        written = [] if mutated else outputs
        elements = max(t.numel() for t in inputs + outputs)
        self.count("elementwise", float(elements), nbytes(*inputs, *written) + (
            nbytes(*outputs) if mutated else 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.addmm.dtype_out and kwargs["out"].device.type == "meta":
            out = meta_addmm_dtype_out(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in _tensors(out):
            if t.device.type == "meta":
                self._track(t)
        self._cost(func, args, kwargs, out)
        return out


# ------------------------------------------------------------------------------------------------------------
# the dry run
# ------------------------------------------------------------------------------------------------------------
@dataclass
class DryRun:
    """What one optimizer step of the real engine needs, from a dry run (bytes, FLOPs, per step)."""
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    micro_batches: list[tuple[int, int]]     # (rows, seq_len) of each micro-batch
    num_parameters: int
    host_store: list[tuple[str, bool, int]]  # (kind, pinned, reserved bytes), one per kind and pinning
    host_step_bytes: int                     # host buffers of the step at their peak (reserved): offloaded
    host_step_pinned: bool                   # checkpoints, the gathered embedding rows and their gradient
    device_peak_bytes: int                   # everything live on the device at the step's worst moment
    device_held_peak_bytes: int              # DeviceMeter's peak: what fit() reports as device_peak_bytes
    device_fixed_bytes: int                  # allocated before the step: staging slots, gradient accumulators
    device_held_at_peak: int                 # DeviceMeter.held at the device peak (fixed, checkpoints, boundary)
    device_workspace_at_peak: int            # kernel workspaces live at the device peak
    h2d_bytes: int
    d2h_bytes: int
    flops: dict[str, float]                  # kind -> FLOPs in the step
    device_memory_bytes: dict[str, int]      # kind -> device-memory bytes read and written
    timeline: list = field(repr=False)       # MetaDevice.timeline of the step
    layer_allocations: list = field(repr=False)   # store.allocations (for the optimizer's host traffic)
    world_size: int = 1                      # data-parallel ranks; the figures are one rank's (one GPU's)
    allreduce_bytes: int = 0                 # the gradients this rank sums with the others (DeviceMeter)

    @property
    def tokens_per_step(self) -> int:
        return sum(rows * seq for rows, seq in self.micro_batches)

    @property
    def host_pinned_bytes(self) -> int:
        step = self.host_step_bytes if self.host_step_pinned else 0
        return sum(n for _, pinned, n in self.host_store if pinned) + step

    @property
    def host_bytes(self) -> int:
        return sum(n for _, _, n in self.host_store) + self.host_step_bytes


def host_store_bytes(allocations) -> list[tuple[str, bool, int]]:
    """(kind, pinned, bytes really taken) summed over a store's allocations, in order of first appearance."""
    totals: dict[tuple[str, bool], int] = {}
    for a in allocations:
        totals[(a.kind, a.pinned)] = totals.get((a.kind, a.pinned), 0) + a.reserved_bytes
    return [(kind, pinned, n) for (kind, pinned), n in totals.items()]


class _DistStandIn:
    """A data-parallel rank of a ``world``-rank job for the dry run: reductions cost nothing here (DeviceMeter
    counts their bytes), and every rank's micro-batches bring distinct token ids (the most rows the union of
    their ids can have: min(vocabulary, world × this rank's distinct ids))."""
    rank, local_rank = 0, 0

    def __init__(self, world: int):
        self.world = world

    def union_ids(self, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        others = torch.arange(min(vocab_size, self.world * ids.numel()), dtype=ids.dtype)
        return torch.unique(torch.cat([ids, others]))

    def reduce_gradient(self, tensor: torch.Tensor, asynchronous: bool, shards=None):
        return None


class _OptimizerStandIn:
    """The pipeline's optimizer during a dry run: nothing to update; the host's wait for layer j goes on the
    timeline (the step-time model makes it wait for the CPU AdamW of the previous step)."""

    def __init__(self, dev: MetaDevice):
        self.dev = dev

    def wait_layer(self, j: int) -> None:
        self.dev.timeline.append(("wait_layer", j))


def micro_batch_shapes(tokens_per_step: int, grad_accum_steps: int, seq_len: int) -> list[tuple[int, int]]:
    """grad_accum_steps micro-batches of equal rows × seq_len making up tokens_per_step."""
    rows, left = divmod(tokens_per_step, grad_accum_steps * seq_len)
    if left or rows < 1:
        raise ValueError(f"tokens_per_step {tokens_per_step} is not a whole number of rows of seq_len {seq_len} "
                         f"in each of grad_accum_steps={grad_accum_steps} micro-batches; choose a multiple of "
                         f"{grad_accum_steps * seq_len}")
    return [(rows, seq_len)] * grad_accum_steps


def _batch(rows: int, seq_len: int, doc_lengths, first_id: int, vocab_size: int) -> dict:
    """A real (CPU) batch of the given shape for data/batch.prepare: token ids first_id, first_id + 1, … (mod the
    vocabulary), so that a step's micro-batches hold min(tokens, vocab) distinct ids, the most embedding rows a
    step can gather; position ids restart at each document."""
    ids = (torch.arange(rows * seq_len, dtype=torch.int64).view(rows, seq_len) + first_id) % vocab_size
    batch = {"input_ids": ids, "labels": ids}
    if doc_lengths is not None:
        pos = torch.cat([torch.arange(n) for n in doc_lengths])
        batch["position_ids"] = pos.expand(rows, seq_len)
    return batch


def _dry_run_pairs(dev, mb) -> PreferenceBatch:
    """DPO's per-token and per-sequence tensors of a micro-batch (a pair per two rows, a row split in two when it
    is the only one), at their real sizes: which sequence each target is in, the sequences' lengths and
    reference log-probs. The values are the meta device's: only their shapes matter here."""
    T = mb.targets.numel()
    num_pairs = max(1, mb.shape[0] // 2)
    seq_index = torch.arange(T) * (2 * num_pairs) // max(T, 1)
    lengths = torch.full((2 * num_pairs,), T / (2 * num_pairs))
    return PreferenceBatch(seq_index=to_device(dev, seq_index), num_pairs=num_pairs,
                           lengths=to_device(dev, lengths), ref_logps=to_device(dev, torch.zeros(2 * num_pairs)))


def dry_run(model_cfg: ModelConfig, train_cfg: TrainConfig | None = None, *, tokens_per_step: int,
            seq_len: int | None = None, doc_len: int | None = None, kernel_backend: str = "triton",
            device_memory_bytes: int = 80 * 2**30, pin_memory: bool = True, world_size: int = 1) -> DryRun:
    """One optimizer step of ``tokens_per_step`` tokens: grad_accum_steps micro-batches of rows × seq_len
    (seq_len default: min(tokens per micro-batch, max_position_embeddings)), each row packed with documents of
    doc_len tokens (the last one shorter) or one document. ``kernel_backend`` is the one modelled ("triton": the
    CUDA path; "torch": the CPU path, its references run on meta as they are); ``device_memory_bytes`` is what
    the device's mem_get_info reports; ``pin_memory``: whether the store is pinned (as on CUDA); ``world_size``:
    one rank of a data-parallel job of that many, each with these micro-batches (its all-reduced gradient
    bytes, and the union of the ranks' ids gathered as embedding rows)."""
    train_cfg = train_cfg or TrainConfig()
    accum = train_cfg.grad_accum_steps
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be ≥ 1, got {tokens_per_step}")
    seq_len = seq_len or min(tokens_per_step // accum or 1, model_cfg.max_position_embeddings)
    doc_lengths = None
    if doc_len is not None and doc_len < seq_len:
        doc_lengths = (doc_len,) * (seq_len // doc_len) + ((seq_len % doc_len,) if seq_len % doc_len else ())
    return dry_run_shapes(model_cfg, train_cfg, micro_batch_shapes(tokens_per_step, accum, seq_len), doc_lengths,
                          kernel_backend=kernel_backend, device_memory_bytes=device_memory_bytes,
                          pin_memory=pin_memory, world_size=world_size)


def dry_run_shapes(model_cfg: ModelConfig, train_cfg: TrainConfig, shapes: list[tuple[int, int]],
                   doc_lengths: tuple[int, ...] | None = None, *, kernel_backend: str, device_memory_bytes: int,
                   pin_memory: bool, world_size: int = 1) -> DryRun:
    """The dry run of one optimizer step whose micro-batches have these (rows, seq_len) shapes."""
    train_cfg = replace(train_cfg, trace_path=None, preflight=False)
    dev = MetaDevice(None, kernel_backend, device_memory_bytes, pin_memory)
    counter = OpCounter(dev)
    dev.ops = meta_ops(kernel_backend, counter, doc_lengths)
    tokens = sum(rows * seq for rows, seq in shapes)
    dpo = train_cfg.objective == "dpo"
    with counter:
        store = build_store(model_cfg, train_cfg, dev)       # the engine's store and pipeline, on meta
        p = build_step_pipeline(model_cfg, train_cfg, store, dev.ops, dev, _OptimizerStandIn(dev))
        # the dense template's rotary tables; a generic model's own code makes its own (data/batch.prepare)
        inv_freq = None if is_generic(model_cfg) else model_cfg.inv_freq().to(dev.torch_device)
        if is_generic(model_cfg):     # its modules (and the model they are copied from) are meta on any device
            modules = (*p.template.layers, p.template.norm, skeleton(model_cfg).lm)
            counter.untrack(t for m in modules for t in m.parameters())
        counter.meter = p.meter
        fixed = counter.device_live
        if world_size > 1:
            p.dist = _DistStandIn(world_size)
        # the batches are made as for the mean loss; with DPO, each gets pairs of its shape (_dry_run_pairs)
        firsts = [sum(r * n for r, n in shapes[:m]) for m in range(len(shapes))]
        mbs = [prepare_batch(_batch(rows, seq, doc_lengths, first, model_cfg.vocab_size), model_cfg, dev, inv_freq,
                             dpo=False, where="dry run")
               for (rows, seq), first in zip(shapes, firsts)]
        for mb in mbs if dpo else ():
            mb.preference = _dry_run_pairs(dev, mb)
        dev.timeline.clear()                  # building the engine and the batches is not part of the step
        p.meter.reset_peak()
        counter.device_peak = counter.device_live
        head = DPOHead(train_cfg, sum(mb.preference.num_pairs for mb in mbs)) if dpo else None
        run_step(p, mbs, grad_scale=1.0 / tokens, preference=head)
        del mbs
    flops, mem = {}, {}
    for item in dev.timeline:
        if item[0] == "task":
            for kind, (f, b) in item[2].items():
                if kind not in ("h2d", "d2h"):
                    flops[kind] = flops.get(kind, 0.0) + f
                    mem[kind] = mem.get(kind, 0) + b
    return DryRun(
        model_cfg=model_cfg, train_cfg=train_cfg, micro_batches=list(shapes),
        num_parameters=store.num_parameters(),
        host_store=host_store_bytes(store.allocations),
        host_step_bytes=counter.host_peak, host_step_pinned=pin_memory,
        device_peak_bytes=counter.device_peak, device_held_peak_bytes=p.meter.peak, device_fixed_bytes=fixed,
        device_held_at_peak=counter.held_at_peak, device_workspace_at_peak=counter.workspace_at_peak,
        h2d_bytes=p.meter.h2d_bytes, d2h_bytes=p.meter.d2h_bytes, flops=flops, device_memory_bytes=mem,
        timeline=dev.timeline, layer_allocations=list(store.allocations), world_size=world_size,
        allreduce_bytes=p.meter.reduced_bytes)


def fixed_device_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, kernel_backend: str,
                       device_memory_bytes: int, pin_memory: bool) -> tuple[int, list]:
    """(bytes the pipeline holds on the device before any step, by DeviceMeter's count; the store's allocations),
    from the engine's store and pipeline built on the meta device, without running a step. No op counter: the
    preflight of every Engine runs this, and the first TorchDispatchMode of a process imports torch._dynamo
    (~150 MB, seconds)."""
    dev = MetaDevice(meta_ops("torch", None, None), kernel_backend, device_memory_bytes, pin_memory)
    store = build_store(model_cfg, train_cfg, dev)
    p = build_step_pipeline(model_cfg, train_cfg, store, dev.ops, dev, _OptimizerStandIn(dev))
    return p.meter.held, list(store.allocations)
