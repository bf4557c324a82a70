"""Host store: host RAM is the authoritative home of every parameter, gradient and optimizer state.

The model is a list of layers: the embedding, the decoder layers, the head (final norm, and lm_head unless it is
tied to the embedding). Each layer owns one contiguous flat buffer per kind. Three layouts:

    bf16 compute (default), fp32 moments: 14 bytes per parameter
        working     bf16   what streams to the compute device, and the high half of the fp32 master
        master_low  int16  the low half: (working, master_low) is the fp32 master, exactly (host_formats.py);
                           the working weights are the master rounded to nearest (exact ties away from zero)
        exp_avg, exp_avg_sq  fp32  AdamW moments
        grad        bf16   the step's gradient, written once per step from the device's fp32 accumulator
    bf16 compute, optimizer_states="8bit": 8 bytes per parameter (+ 8 bytes per 256)
        working, master_low, grad as above
        exp_avg_q, exp_avg_sq_q          uint8  blockwise 8-bit codes of the moments of the decayed (matrix)
        exp_avg_scale, exp_avg_sq_scale  fp32   parameters, one scale per 256-element block
        exp_avg, exp_avg_sq              fp32   moments of the rest (norms, biases: a few thousand per layer)
    fp32 compute (exact mode): 16 bytes per parameter
        master      fp32   the optimizer's weights, streamed as they are
        exp_avg, exp_avg_sq, grad  fp32
    LoRA (``lora=``, lora.py): 2 bytes per base parameter (4 in fp32 mode) + 16 per adapter parameter
        working (or master)  the frozen base, its streamed weights alone: no master, moments or gradient
        lora_working + lora_master_low (or lora_master), lora_exp_avg, lora_exp_avg_sq, lora_grad (fp32):
                    each decoder layer's adapters (A and B of every target, store.adapter_layouts), trained as
                    a full store's layers are (``store.trainable`` has their buffers for the optimizer)

Every parameter is a view into these buffers; nothing else holds a copy of the model. ``master_values`` is the
one way to read the fp32 master (a view in fp32 mode, reconstructed from the halves otherwise), ``set_master``
the one way to write it.

Pinned (when the compute device is CUDA): only what crosses the bus, the working weights (the master in fp32
mode) and the gradients, each at its exact size (pinning.py); master halves and moments stay pageable: only the
CPU optimizer reads them.

Shared (a data-parallel job's local ranks, ``shared=NodeShare(...)``): the same buffers, in POSIX shared memory
that every local rank of the node maps (node_store.py); each process pins in its own address space what it
copies: all the working weights, and the pages of its own shard of the gradients. A LoRA store shares its frozen
base and its adapters' buffers alike; the shards are of the adapters.

Inside a layer, parameters that take weight decay (2+ dimensions) come first, so one AdamW call covers them and
a second the rest; q/k/v rows are adjacent (one fused [q+2kv, H] matrix), as are gate/up and the q/k/v biases.
"""
from __future__ import annotations

from dataclasses import dataclass

import weakref

import torch

from horizon_triton.kernels.host_formats import QBLOCK, join_master, num_blocks, split_master

from ..config import ModelConfig
from ..models.family import adapter_layouts, layer_layouts
from ..models.layout import LayerLayout
from .node_store import BOARD, NodeBoard, NodeShare, map_segments
from .pinning import HostPinner, arena, arena_span, cuda_register_functions

INIT_STD = 0.02  # transformers' initializer_range default for these families


PAGE_BYTES = 4096


def host_block_bytes(nbytes: int, pinned: bool) -> int:
    """Bytes one host allocation of ``nbytes`` made through torch really takes: PyTorch's caching host allocator
    rounds every pinned block up to a power of two (a 3.4 GB buffer takes 4 GiB); a pageable one takes whole pages.
    (The store's own buffers are pinned at their exact size instead: Allocation.reserved_bytes.)"""
    if pinned:
        return 1 << max(0, nbytes - 1).bit_length()
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


@dataclass(frozen=True)
class Allocation:
    """One host buffer of the store, as the accounting (nbytes, the dry run, checkpoints) sees it."""
    kind: str              # "working", "master_low", "master", "exp_avg", "exp_avg_sq", "exp_avg_q", ..., "grad"
    layer: int             # index into layouts
    numel: int
    dtype: torch.dtype
    pinned: bool           # page-locked at its exact size (a CUDA run), or would be (device="meta")
    frozen: bool = False   # the frozen base of a LoRA store: nothing but the stream reads it, never the optimizer
    shared: bool = False   # in a node's shared memory (node_store.py): its bytes are taken once per node,
                           # however many local ranks map it; the pinning is per process, of the same pages
                           # (of a shared gradient, each rank pins only its shard's pages)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def reserved_bytes(self) -> int:
        """What the allocation takes from the machine: whole pages, pinned or not (the store registers its own
        arenas at their exact size, pinning.py)."""
        return -(-self.nbytes // PAGE_BYTES) * PAGE_BYTES


OPTIMIZER_STATES = ("fp32", "8bit")
_SPLIT_CHUNK = 1 << 20           # elements split per call in set_master


class HostStore:
    """Flat per-layer host buffers and the parameter views into them; the buffers that cross the bus pinned
    when ``pin`` (through ``pinner``, by default the CUDA runtime's cudaHostRegister).

    ``device="meta"`` builds the same layout with no memory behind it (the dry run's store).

    ``shared``: the local ranks of a node share one store (node_store.py). Every local rank builds it with its
    NodeShare; local rank 0 creates the buffers in shared memory, the others map them, and ``fill_shared`` is
    how values are then written (by local rank 0 alone). ``store.shared`` is that NodeShare (None for a private
    store), ``store.board`` the ranks' progress board; ``allocations`` and ``nbytes`` describe the same buffers
    in every local rank, taken once per node (Allocation.shared)."""

    def __init__(self, cfg: ModelConfig, compute_dtype: torch.dtype, pin: bool = False, device: str = "cpu",
                 optimizer_states: str = "fp32", pinner: HostPinner | None = None, lora=None,
                 shared: NodeShare | None = None):
        if optimizer_states not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_states must be one of {OPTIMIZER_STATES}, got {optimizer_states!r}")
        if optimizer_states == "8bit" and compute_dtype != torch.bfloat16:
            raise ValueError("optimizer_states='8bit' needs compute_dtype='bfloat16' (the 8-bit layout keeps the "
                             "master as bf16 + int16 halves); use optimizer_states='fp32' in float32 mode")
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.optimizer_states = optimizer_states
        self.split_master = compute_dtype == torch.bfloat16
        self.pinned = pin
        self.device = torch.device(device)
        self.layouts = layer_layouts(cfg)
        self.allocations: list[Allocation] = []
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._pinner = None
        if pin and self.device.type == "cpu":
            self._pinner = pinner or HostPinner(*cuda_register_functions())
            weakref.finalize(self, self._pinner.close)   # unregistered before the arenas are freed
        self.shared = shared
        self.board: NodeBoard | None = None
        self.lora = lora                      # a lora.LoraSpec: the LoRA layout below
        self.trainable = self                 # what the optimizer updates and the backward's gradients fill
        if lora is not None:
            self.adapter_layouts = adapter_layouts(cfg, lora)
        kinds = self._lora_kinds(pin) if lora is not None else self._kinds(pin)
        segments = {}
        if shared is not None:
            if self.device.type != "cpu":
                raise ValueError(f"a shared store lives in host memory; device={device!r} has none to share")
            spans = {kind: arena_span([n * dtype.itemsize for n in sizes]) for kind, sizes, dtype, _ in kinds}
            spans[BOARD] = NodeBoard.nbytes(shared.local_world, self.num_layers)
            segments = map_segments(shared, spans)
            self.board = NodeBoard(shared, segments.pop(BOARD), self.num_layers)
        for kind, sizes, dtype, pinned in kinds:      # a LoRA store's base is all but the adapters' kinds
            self.alloc_kind(kind, sizes, dtype, pinned, segments.get(kind),
                             frozen=lora is not None and not kind.startswith("lora_"))
        self.working: list[torch.Tensor] = self._buffers["working" if self.split_master else "master"]
        if lora is not None:
            self._bind_lora()
            return
        self.grad: list[torch.Tensor] = self._buffers["grad"]
        self.exp_avg: list[torch.Tensor] = self._buffers["exp_avg"]
        self.exp_avg_sq: list[torch.Tensor] = self._buffers["exp_avg_sq"]
        if self.split_master:
            self.master_low: list[torch.Tensor] = self._buffers["master_low"]

    def _lora_kinds(self, pin: bool) -> list[tuple[str, list[int], torch.dtype, bool]]:
        """The LoRA layout's kinds (as _kinds): the base frozen as its working weights alone (bf16, or fp32 in
        float32 mode: 2 or 4 bytes per base parameter, no master, moments or gradient), and for each decoder
        layer one flat buffer of each kind for its adapters, which train as the full store's layers do: working
        bf16 + int16 low half (the exact fp32 master) or the fp32 master, fp32 moments and an fp32 gradient, 16
        bytes per adapter parameter. Shared by a node's ranks, the base is one copy that only streams; each rank
        owns a shard of every layer's adapters (shard_bounds), as of a full store's layers."""
        sizes = [layout.numel for layout in self.layouts]
        adapter = [layout.numel for layout in self.adapter_layouts]
        f32 = torch.float32
        kinds = [("working" if self.split_master else "master", sizes, self.compute_dtype, pin)]
        if self.split_master:
            kinds += [("lora_working", adapter, self.compute_dtype, pin),
                      ("lora_master_low", adapter, torch.int16, False)]
        else:
            kinds += [("lora_master", adapter, f32, pin)]
        return kinds + [("lora_exp_avg", adapter, f32, False), ("lora_exp_avg_sq", adapter, f32, False),
                        ("lora_grad", adapter, f32, pin)]

    def _bind_lora(self) -> None:
        """The trainable part is ``self.trainable`` (TrainableBuffers): the optimizer and the scheduler's gradient
        copies see the adapters' buffers exactly as they see a full store's layers."""
        b = self._buffers
        self.trainable = TrainableBuffers(
            layouts=self.adapter_layouts, split_master=self.split_master, optimizer_states="fp32",
            working=b["lora_working" if self.split_master else "lora_master"], master=b.get("lora_master"),
            master_low=b.get("lora_master_low"), exp_avg=b["lora_exp_avg"], exp_avg_sq=b["lora_exp_avg_sq"],
            grad=b["lora_grad"])

    def _kinds(self, pin: bool) -> list[tuple[str, list[int], torch.dtype, bool]]:
        """(kind, elements per layer, dtype, pinned) of every buffer kind of this layout (all start zero-filled)."""
        sizes = [layout.numel for layout in self.layouts]
        decayed = [layout.decay_numel for layout in self.layouts]
        f32 = torch.float32
        if self.split_master:
            kinds = [("working", sizes, self.compute_dtype, pin), ("master_low", sizes, torch.int16, False)]
        else:
            kinds = [("master", sizes, f32, pin)]                        # streamed as it is: no second copy
        if self.optimizer_states == "8bit":
            blocks = [num_blocks(n) for n in decayed]
            for moment in ("exp_avg", "exp_avg_sq"):
                kinds += [(f"{moment}_q", decayed, torch.uint8, False), (f"{moment}_scale", blocks, f32, False)]
            rest = [n - d for n, d in zip(sizes, decayed)]               # norms and biases stay fp32
            kinds += [("exp_avg", rest, f32, False), ("exp_avg_sq", rest, f32, False)]
        else:
            kinds += [("exp_avg", sizes, f32, False), ("exp_avg_sq", sizes, f32, False)]
        return kinds + [("grad", sizes, self.compute_dtype, pin)]

    def alloc_kind(self, kind: str, sizes: list[int], dtype: torch.dtype, pinned: bool = False,
                   segment: torch.Tensor | None = None, frozen: bool = False) -> None:
        """Every host buffer of the store is made here, one per layer, so that what is counted is what is
        allocated: one arena per kind (pinning.arena: zero-filled pages mapped for it alone), each layer's
        page-aligned region registered in the background if the kind is pinned. ``segment``: the kind's shared
        memory (a shared store), already zero-filled, and which no process but local rank 0 may write before the
        store is filled."""
        nbytes = [n * dtype.itemsize for n in sizes]
        pin_here = pinned and self._pinner is not None
        regions = None
        if pin_here:
            regions = self._pinner.arena(nbytes, base=segment)
        elif self.device.type == "cpu":
            regions = arena(nbytes, base=segment)
        buffers = []
        for layer, n in enumerate(sizes):
            if n:                  # a LoRA store's embed and head have no adapters: no buffer to count or save
                self.allocations.append(Allocation(kind, layer, n, dtype, pinned, frozen, self.shared is not None))
            if regions is None:                              # the meta device: a layout without memory
                buffers.append(torch.empty(n, dtype=dtype, device=self.device))
                continue
            buffers.append(regions[layer].view(dtype))
            if pin_here:
                self._pinner.pin((kind, layer), self._pinned_part(kind, layer, regions[layer], dtype))
        self._buffers[kind] = buffers

    def _pinned_part(self, kind: str, layer: int, region: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What this process registers of a pinned region: all of it, but of a shared store's gradient only the
        pages holding this rank's shard (it copies out nothing else; the ranks' page ranges may share a page
        at each end, registered once in each process)."""
        if self.shared is None or kind not in ("grad", "lora_grad") or self.shared.local_world == 1:
            return region
        lo, hi = self.shard_bounds(layer, self.shared.local_rank, self.shared.local_world)
        start = lo * dtype.itemsize // PAGE_BYTES * PAGE_BYTES
        return region[start:max(start, hi * dtype.itemsize)]

    def wait_pinned(self, layer: int) -> None:
        """Before a layer's first transfer: blocks until its pinned buffers are registered (no-op unpinned)."""
        if self._pinner is not None:
            for kind in ("working", "master", "grad", "lora_working", "lora_master", "lora_grad"):
                self._pinner.wait((kind, layer))

    def close(self) -> None:
        """Unregisters the pinned buffers (they stay usable as pageable memory). A shared store also lets go of
        its mapping: the memory is unmapped when no view of it remains in this process, and freed when the last
        local rank unmaps it (idempotent)."""
        if self._pinner is not None:
            self._pinner.close()
        if self.shared is not None:
            for buffers in self._buffers.values():
                buffers.clear()
            self.board = None

    def fill_shared(self, fill) -> None:
        """Runs ``fill()``, the writing of the store's values (load_weights, init_random, a checkpoint), where it
        belongs: here for a private store; on local rank 0 for a shared one, the others returning once it is
        done (or raising if it failed or local rank 0 is gone). Every local rank calls it, in the same order."""
        if self.shared is None:
            fill()
        elif self.shared.creator:
            try:
                fill()
            except BaseException as e:
                self.board.mark_failed(f"filling the shared store raised {type(e).__name__}: {e}")
                raise
            self.board.publish_fill()
        else:
            self.board.wait_fill()

    def shard_bounds(self, layer: int, local_rank: int, local_world: int) -> tuple[int, int]:
        """Elements [lo, hi) of ``layer`` that local rank ``local_rank`` of ``local_world`` owns: the ranks'
        ranges are disjoint, cover the layer, cut only on QBLOCK (256-element) boundaries, so that an 8-bit
        moment block and its scale belong to one rank, and differ in size by at most one block. A cut may fall
        in the decayed prefix [0, decay_numel) or in the rest; the owner splits its range there. A LoRA store's
        trainable elements, and so its shards, are the layer's adapters."""
        if not 0 <= local_rank < local_world:
            raise ValueError(f"local_rank {local_rank} is not in [0, {local_world})")
        n = (self.adapter_layouts if self.lora is not None else self.layouts)[layer].numel
        blocks = num_blocks(n)
        return (min(n, blocks * local_rank // local_world * QBLOCK),
                min(n, blocks * (local_rank + 1) // local_world * QBLOCK))

    def state_buffers(self):
        """(kind, layer index, tensor) for every buffer a training checkpoint must hold: all of them but the
        gradient, which each step rewrites before it is read, and a LoRA store's frozen base, which the engine
        loads from the model again (model_cfg.source_path, or the seeded init)."""
        for a in self.allocations:
            if a.kind not in ("grad", "lora_grad") and not a.frozen:
                yield a.kind, a.layer, self._buffers[a.kind][a.layer]

    @property
    def num_layers(self) -> int:
        return len(self.layouts)

    def num_parameters(self) -> int:
        return sum(layout.numel for layout in self.layouts)

    def nbytes(self, pinned: bool | None = None) -> int:
        """Bytes the store holds on the host (only the pinned, or only the pageable ones, if asked). Pinned
        buffers are locked at these sizes, plus at most one page each."""
        return sum(a.nbytes for a in self.allocations if pinned is None or a.pinned == pinned)

    # ---- the fp32 master ----------------------------------------------------------------------------------
    def master_values(self, layer: int, start: int = 0, end: int | None = None, adapters: bool = False) -> torch.Tensor:
        """fp32 master of elements [start, end) of a layer (of its adapters, in a LoRA store): a view in fp32 mode
        (writes go through), a new tensor reconstructed exactly from the two halves in bf16 mode (write with
        ``set_master``). A LoRA store's frozen bf16 base has no master: its weights widened to fp32."""
        pre = "lora_" if adapters else ""
        if not self.split_master:
            return self._buffers[pre + "master"][layer][start:end]
        if self.lora is not None and not adapters:
            return self._buffers["working"][layer][start:end].float()
        return join_master(self._buffers[pre + "working"][layer][start:end],
                           self._buffers[pre + "master_low"][layer][start:end])

    def set_master(self, layer: int, values: torch.Tensor, start: int = 0, adapters: bool = False) -> None:
        """Writes fp32 ``values`` (any shape, flattened) as the master of elements [start, start + numel) of a
        layer (of its adapters), and with it the working weights: both halves exactly, in bf16 mode. A LoRA
        store's frozen bf16 base is rounded to nearest even, as transformers' .to(torch.bfloat16)."""
        values = values.reshape(-1).to(torch.float32)
        end = start + values.numel()
        pre = "lora_" if adapters else ""
        if not self.split_master:
            self._buffers[pre + "master"][layer][start:end].copy_(values)
            return
        if self.lora is not None and not adapters:
            self._buffers["working"][layer][start:end].copy_(values)
            return
        # in chunks: split_master's integer temporaries stay small and of one size, so the allocator reuses
        # them instead of leaving a parameter-sized hole per parameter in the heap
        for lo in range(0, values.numel(), _SPLIT_CHUNK):
            hi = min(lo + _SPLIT_CHUNK, values.numel())
            split_master(values[lo:hi], self._buffers[pre + "working"][layer][start + lo:start + hi],
                         self._buffers[pre + "master_low"][layer][start + lo:start + hi])

    def buffers(self, kind: str) -> list[torch.Tensor]:
        """The per-layer buffers of one kind (see the module docstring for the kinds of each layout)."""
        return self._buffers[kind]

    @property
    def master(self):
        """fp32 master of every layer, read only in bf16 mode: store.master[i] is ``master_values(i)``."""
        if not self.split_master:
            return self._buffers["master"]
        return _MasterValues(self)

    def named_params(self):
        """(hf_name, layer index, Param) for every parameter, in layer order."""
        for index, layout in enumerate(self.layouts):
            for p in layout.params:
                yield p.hf_name, index, p

    def named_master(self):
        """(hf_name, fp32 tensor) for every parameter, in layer order, one parameter reconstructed at a time."""
        for name, index, p in self.named_params():
            yield name, self.master_values(index, p.offset, p.offset + p.numel).view(p.shape)

    def init_random(self, seed: int) -> None:
        """transformers' init: normal(0, 0.02) matrices, ones for norms, zeros for biases and the pad token's
        embedding row; one generator per layer so that building a model never needs more than its own buffers
        and one parameter's fp32 copy."""
        scratch = torch.empty(max(p.numel for layout in self.layouts for p in layout.params))  # one allocation
        for index, layout in enumerate(self.layouts):
            gen = torch.Generator().manual_seed(seed * 100003 + index)
            for p in layout.params:
                values = scratch[:p.numel]
                if p.decay:
                    values.normal_(0.0, INIT_STD, generator=gen)
                elif p.key.endswith("bias"):
                    values.zero_()
                else:
                    values.fill_(1.0)
                if index == 0 and self.cfg.pad_row is not None:   # as nn.Embedding(padding_idx) starts it
                    values.view(p.shape)[self.cfg.pad_row].zero_()
                self.set_master(index, values, p.offset)


@dataclass
class TrainableBuffers:
    """A LoRA store's trainable part, with the attributes of a HostStore the optimizer and the scheduler's gradient
    copies read: per-layer adapter layouts and buffers (empty for the embed and the head)."""
    layouts: list[LayerLayout]
    split_master: bool
    optimizer_states: str
    working: list[torch.Tensor]              # bf16 high halves, or the fp32 master itself
    master: list[torch.Tensor] | None        # fp32 mode only
    master_low: list[torch.Tensor] | None    # bf16 mode only
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    grad: list[torch.Tensor]                 # fp32


class _MasterValues:
    """store.master in bf16 mode: a sequence of reconstructed fp32 layers (copies: writing them changes
    nothing; use store.set_master)."""

    def __init__(self, store: HostStore):
        self._store = store

    def __len__(self) -> int:
        return self._store.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor:
        if not -len(self) <= layer < len(self):
            raise IndexError(f"layer {layer} out of range for {len(self)} layers")
        return self._store.master_values(layer % len(self))

    def __iter__(self):
        return (self[i] for i in range(len(self)))
