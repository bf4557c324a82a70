"""What the scheduler keeps on the compute device between its primitives, fixed in size: the ``Pipeline`` (staging
slots, fp32 gradient accumulators, their events) built by ``build_pipeline``, the ``Unit`` that passes through a
slot, and the ``DeviceMeter`` that counts the device bytes held and the bus bytes moved. The scheduler, the
activation checkpoints and the embedding rows all read it; it imports none of them."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..host.store import HostStore
from ..models.family import layer_template


@dataclass(frozen=True)
class Unit:
    """What one pass through a staging slot computes with: decoder layer ``layer``, or (layer = the head) the
    vocabulary rows [start, stop) of lm_head (of the embedding when tied) followed by the final norm."""
    layer: int
    start: int = 0
    stop: int = 0


@dataclass
class Pipeline:
    """Everything the scheduler keeps on the compute device between primitives: fixed in size."""
    cfg: ModelConfig
    store: HostStore
    ops: object
    dev: object
    optimizer: object                              # .wait_layer(i): blocks until layer i holds new weights
    slots: list[torch.Tensor]                      # staging slots, compute dtype: the largest decoder layer
    slot_ready: list = field(default_factory=list)
    slot_free: list = field(default_factory=list)
    accs: list[torch.Tensor] = field(default_factory=list)   # 2 ping-pong fp32 accumulators: layers, head chunks
    acc_free: list = field(default_factory=list)
    norm_acc: torch.Tensor | None = None           # fp32 [H]: the final norm's gradient
    head_rows: int = 0                             # lm_head rows per vocabulary chunk (all of them: one pass)
    embed_grad_rows: torch.Tensor | None = None    # host: rows of the untied embedding's grad the last step wrote
    dist: object = None                            # the data-parallel context (distributed.py), None: alone
    meter: "DeviceMeter" = None
    tracer: object = None
    checkpoint_budget: int | None = None           # bytes of activation checkpoints kept on the device (override)
    template: object = None                        # the layers' computations (models.family.layer_template)
    merge_microbatches: int = 1                    # micro-batches through a MoE layer together (TrainConfig's)

    @property
    def head(self) -> int:
        return self.store.num_layers - 1

    def sources(self, u: Unit) -> list[int]:
        """Host layers whose weights unit u computes with (the tied head reads the embedding)."""
        return [u.layer, 0] if u.layer == self.head and self.cfg.tie_word_embeddings else [u.layer]

    def name(self, u: Unit) -> str:
        return self.store.layouts[u.layer].name + (f"[{u.start}:{u.stop}]" if u.layer == self.head else "")

    def head_chunks(self) -> list[Unit]:
        V = self.cfg.vocab_size
        return [Unit(self.head, a, min(a + self.head_rows, V)) for a in range(0, V, self.head_rows)]

    @property
    def sharded(self) -> bool:
        """Whether this rank streams out only its shard of each reduced gradient (the node's ranks share one
        host store, each updating its shard)."""
        return self.dist is not None and getattr(self.store, "shared", None) is not None

    def shard(self, layer: int) -> tuple[int, int]:
        """Elements [lo, hi) of host layer ``layer`` whose gradient this rank writes: all of them unless sharded."""
        if not self.sharded:
            return 0, self.store.trainable.layouts[layer].numel
        shared = self.store.shared
        return self.store.shard_bounds(layer, shared.local_rank, shared.local_world)

    def head_offsets(self, u: Unit) -> tuple[int, int, int]:
        """(host layer, element offset there) of head chunk u's rows, and the final norm's offset in the head."""
        H, offsets = self.cfg.hidden_size, {q.key: q.offset for q in self.store.layouts[self.head].params}
        if self.cfg.tie_word_embeddings:
            return 0, u.start * H, offsets["norm"]
        return self.head, offsets["lm_head"] + u.start * H, offsets["norm"]

    def head_segments(self, buffers: list[torch.Tensor], u: Unit) -> tuple[torch.Tensor, torch.Tensor]:
        """(lm_head rows [start, stop), final norm) as flat views of one of the store's per-layer buffer lists."""
        H, layout = self.cfg.hidden_size, self.store.layouts[self.head]
        offsets = {q.key: q.offset for q in layout.params}
        table = buffers[0] if self.cfg.tie_word_embeddings else buffers[self.head][offsets["lm_head"]:]
        norm = buffers[self.head][offsets["norm"]:offsets["norm"] + H]
        return table[u.start * H:u.stop * H], norm


class DeviceMeter:
    """Bytes the engine holds on the compute device (slots, accumulators, checkpoints, activations, gradients), and
    the bytes every copy moved across the bus since the pipeline was built (h2d_bytes, d2h_bytes)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.held = 0
        self.peak = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.reduced_bytes = 0          # data parallel: bytes of the tensors this rank all-reduced

    def add(self, t: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.held += t.numel() * t.element_size()
            self.peak = max(self.peak, self.held)
        return t

    def sub(self, t: torch.Tensor) -> None:
        with self._lock:
            self.held -= t.numel() * t.element_size()

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.held

    def reduced(self, t: torch.Tensor) -> None:
        """Counts an all-reduce of t (a ring moves 2·(W-1)/W of its bytes out of each rank, and as many in)."""
        with self._lock:
            self.reduced_bytes += t.numel() * t.element_size()

    def copied(self, t: torch.Tensor, to_device: bool) -> None:
        """Counts a host<->device copy of t's bytes (called where the copy runs)."""
        with self._lock:
            if to_device:
                self.h2d_bytes += t.numel() * t.element_size()
            else:
                self.d2h_bytes += t.numel() * t.element_size()


def build_pipeline(cfg, store, ops, dev, optimizer, num_slots: int, tracer=None,
                   checkpoint_budget: int | None = None, head_rows: int | None = None,
                   merge_microbatches: int = 1) -> Pipeline:
    """Slots and accumulators hold the largest decoder layer, whatever the vocabulary: the embedding never
    streams (its rows are gathered on the host) and the head streams in chunks of ``head_rows`` vocabulary rows
    (default: as many as a slot holds next to the final norm; all of them when they fit, which runs the fused
    one-pass cross-entropy)."""
    torch_dev = dev.torch_device
    meter = DeviceMeter()
    p = Pipeline(cfg, store, ops, dev, optimizer, slots=[], meter=meter, tracer=tracer,
                 checkpoint_budget=checkpoint_budget, merge_microbatches=merge_microbatches,
                 template=layer_template(cfg, torch_dev, store.compute_dtype))
    H, V = cfg.hidden_size, cfg.vocab_size
    trained = store.trainable.layouts            # a LoRA store's adapters ride in the slot after their layer's base
    extra = [trained[i].numel if store.lora is not None else 0 for i in range(len(store.layouts))]
    capacity = max(max((store.layouts[i].numel + extra[i] for i in range(1, len(extra) - 1)), default=0), 2 * H)
    p.head_rows = min(V, head_rows or V, (capacity - H) // H)
    p.slots = [meter.add(torch.empty(capacity, dtype=store.compute_dtype, device=torch_dev))
               for _ in range(num_slots)]
    p.slot_ready = [None] * num_slots
    p.slot_free = [None] * num_slots
    # the accumulators hold the largest gradient: a decoder layer's, or only its adapters' with a frozen base
    acc_size = capacity if store.lora is None else max(max(extra), 1)
    p.accs = [meter.add(torch.zeros(acc_size, dtype=torch.float32, device=torch_dev)) for _ in range(2)]
    p.acc_free = [None, None]
    p.norm_acc = meter.add(torch.zeros(H, dtype=torch.float32, device=torch_dev))
    return p
