"""The scheduler: streams layer weights through device staging slots while the compute stream works.

Four primitives, each issuing work to one stream of the device (see device.py):

    stream_in(i, slot)   copy_in   layer i's working weights: pinned host store -> staging slot
    bind(i, slot)        (host)    views of the slot shaped as layer i's parameters (no device copy)
    compute(i, ...)      compute   forward of every micro-batch, or recompute + backward
    stream_out(i)        copy_out  layer i's fp32 gradient accumulator -> host grad buffer (once per step)

and ``run_step`` strings them together. Layers are [embed, decoder 1..L, head] as in store.py. Within a step
the work is layer-major: every micro-batch passes through layer i while its weights are resident, so weights
cross the bus twice per step (forward, backward) whatever the number of micro-batches.

Ordering, enforced with events so that the async test device catches any missing wait:
- a slot is refilled only after the compute that read it finished      (slot_free[slot])
- compute reads a slot only after its copy finished                    (slot_ready[slot])
- a gradient accumulator is zeroed for reuse only after its copy-out   (acc_free[k])
- layer i streams in only after the optimizer updated it               (host waits optimizer.layer_done(i))
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from . import layer as lt
from .config import ModelConfig
from .store import HostStore


@dataclass
class Pipeline:
    """Everything the scheduler keeps on the compute device between primitives: fixed in size."""
    cfg: ModelConfig
    store: HostStore
    ops: object
    dev: object
    optimizer: object                              # .wait_layer(i): blocks until layer i holds new weights
    slots: list[torch.Tensor]                      # staging slots, compute dtype, capacity of the largest layer
    slot_ready: list = field(default_factory=list)
    slot_free: list = field(default_factory=list)
    accs: list[torch.Tensor] = field(default_factory=list)   # 2 ping-pong fp32 accumulators for decoder layers
    acc_free: list = field(default_factory=list)
    embed_acc: torch.Tensor | None = None          # fp32; also receives the tied lm_head gradient
    head_acc: torch.Tensor | None = None
    meter: "DeviceMeter" = None
    tracer: object = None
    checkpoint_budget: int | None = None           # bytes of activation checkpoints kept on the device

    @property
    def head(self) -> int:
        return self.store.num_layers - 1

    def sources(self, i: int) -> list[int]:
        """Host layers whose weights layer i computes with (the tied head also reads the embedding)."""
        return [i, 0] if i == self.head and self.cfg.tie_word_embeddings else [i]


class DeviceMeter:
    """Bytes the engine holds on the compute device (slots, accumulators, checkpoints, activation grads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.held = 0
        self.peak = 0

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


def build_pipeline(cfg, store, ops, dev, optimizer, num_slots: int, tracer=None,
                   checkpoint_budget: int | None = None) -> Pipeline:
    torch_dev = dev.torch_device
    meter = DeviceMeter()
    p = Pipeline(cfg, store, ops, dev, optimizer, slots=[], meter=meter, tracer=tracer,
                 checkpoint_budget=checkpoint_budget)
    capacity = max(sum(store.layouts[j].numel for j in p.sources(i)) for i in range(store.num_layers))
    decoder_numel = max((lay.numel for lay in store.layouts[1:-1]), default=0)
    p.slots = [meter.add(torch.empty(capacity, dtype=store.compute_dtype, device=torch_dev))
               for _ in range(num_slots)]
    p.slot_ready = [None] * num_slots
    p.slot_free = [None] * num_slots
    p.accs = [meter.add(torch.zeros(decoder_numel, dtype=torch.float32, device=torch_dev)) for _ in range(2)]
    p.acc_free = [None, None]
    p.embed_acc = meter.add(torch.zeros(store.layouts[0].numel, dtype=torch.float32, device=torch_dev))
    p.head_acc = meter.add(torch.zeros(store.layouts[-1].numel, dtype=torch.float32, device=torch_dev))
    return p


# ------------------------------------------------------------------------------------------------------------
# the four primitives
# ------------------------------------------------------------------------------------------------------------
def stream_in(p: Pipeline, i: int, slot: int) -> None:
    """copy_in stream. Waits (host) for the optimizer to have updated layer i, then (stream) for the last compute
    that read ``slot``; copies layer i's working weights into the slot and records slot_ready[slot]."""
    sources = p.sources(i)
    for j in sources:
        p.optimizer.wait_layer(j)
    p.dev.wait("copy_in", p.slot_free[slot])
    dst, offset = p.slots[slot], 0
    for j in sources:
        p.store.wait_pinned(j)                  # host: only before the first copy of j, while pinning runs
        host = p.store.working[j]
        seg = dst[offset:offset + host.numel()]
        p.dev.submit("copy_in", _traced(p, f"stream_in {p.store.layouts[j].name}", "copy_in",
                                        lambda seg=seg, host=host: seg.copy_(host, non_blocking=True)))
        offset += host.numel()
    p.slot_ready[slot] = p.dev.record("copy_in")


def bind(p: Pipeline, i: int, slot: int) -> dict[str, torch.Tensor]:
    """Host only: layer i's parameters as views into the slot (nothing is copied on the device)."""
    views, offset = {}, 0
    for j in p.sources(i):
        layout = p.store.layouts[j]
        views.update(layout.views(p.slots[slot][offset:offset + layout.numel]))
        offset += layout.numel
    if i == p.head and p.cfg.tie_word_embeddings:
        views["lm_head"] = views.pop("embed")
    return views


def compute(p: Pipeline, i: int, slot: int | None, work, name: str) -> None:
    """compute stream. Waits for slot_ready[slot], runs ``work`` (every micro-batch through layer i), then
    records slot_free[slot] so the copy-in stream may refill the slot."""
    if slot is not None:
        p.dev.wait("compute", p.slot_ready[slot])
    p.dev.submit("compute", _traced(p, name, "compute", work))
    if slot is not None:
        p.slot_free[slot] = p.dev.record("compute")


def stream_out(p: Pipeline, i: int, acc: torch.Tensor):
    """copy_out stream. Waits for the compute that finished layer i's gradient and copies the fp32 accumulator
    into the host grad buffer (on CUDA rounded on the device first: half the bus bytes in bf16 mode).
    Returns the event after which the accumulator may be reused."""
    p.dev.wait("copy_out", p.dev.record("compute"))
    p.store.wait_pinned(i)
    host = p.store.grad[i]

    def copy():
        if acc.device.type == "cpu":
            host.copy_(acc)
            return
        staged = acc.to(host.dtype)
        host.copy_(staged, non_blocking=True)
        p.dev.retain(staged, "copy_out")    # freed now, its memory reused only after the copy has run
    p.dev.submit("copy_out", _traced(p, f"stream_out {p.store.layouts[i].name}", "copy_out", copy))
    return p.dev.record("copy_out")


def _sq_norm(acc: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a device scalar, without a layer-sized temporary."""
    return torch.linalg.vector_norm(acc).square()


def _traced(p: Pipeline, name: str, stream: str, fn):
    return fn if p.tracer is None else p.tracer.wrap(name, stream, fn)


# ------------------------------------------------------------------------------------------------------------
# one optimizer step's forward and backward
# ------------------------------------------------------------------------------------------------------------
class Checkpoints:
    """Each decoder layer's input per micro-batch. Kept on the device while they fit ``budget`` bytes; the rest go
    to host memory on the copy-out stream during the forward and come back on the copy-in stream one layer
    ahead of the backward. Which ones go is decided on the host from their sizes, so no sync is needed."""

    def __init__(self, p: Pipeline, num_layers: int, num_mbs: int):
        self.p = p
        self.on_device = [[None] * num_mbs for _ in range(num_layers + 1)]   # [layer][mb] device tensors
        self.on_host = [[None] * num_mbs for _ in range(num_layers + 1)]     # [layer][mb] host tensors
        self.offloaded = [([], None)] * (num_layers + 1)                      # (mbs, event: copies done)
        self.ready = [None] * (num_layers + 1)                                # event: prefetch done
        self.kept_bytes = 0

    def save(self, i: int, hidden: list, nbytes: list[int]) -> None:
        """Host, after the compute that produced layer i's input in ``hidden``: keep it or stream it out."""
        p = self.p
        offload = []
        for m, size in enumerate(nbytes):
            keep = p.checkpoint_budget is None or self.kept_bytes + size <= p.checkpoint_budget
            self.kept_bytes += size if keep else 0
            if not keep:
                offload.append(m)
            # compute stream, right after the producing work: hold this very tensor (hidden[m] moves on)
            p.dev.submit("compute", lambda m=m, keep=keep: (self.on_device[i].__setitem__(m, p.meter.add(hidden[m]))
                                                           if keep else self.on_host[i].__setitem__(m, hidden[m])))
        if not offload:
            return
        p.dev.wait("copy_out", p.dev.record("compute"))
        for m in offload:
            def copy(m=m):
                x = self.on_host[i][m]
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=p.dev.pin_memory)
                host.copy_(x, non_blocking=True)
                p.dev.retain(x, "copy_out")      # the compute stream may drop x before this copy ran
                self.on_host[i][m] = host
            p.dev.submit("copy_out", _traced(p, f"offload checkpoint {i}", "copy_out", copy))
        self.offloaded[i] = (offload, p.dev.record("copy_out"))

    def prefetch(self, i: int) -> None:
        """copy_in stream: brings layer i's offloaded inputs back; ``wait(i)`` makes compute wait for them."""
        p = self.p
        todo, copied = self.offloaded[i]
        if not todo:
            return
        p.dev.wait("copy_in", copied)
        for m in todo:
            def copy(m=m):
                host = self.on_host[i][m]
                x = torch.empty(host.shape, dtype=host.dtype, device=p.dev.torch_device)
                x.copy_(host, non_blocking=True)
                p.dev.retain(x, "compute")
                self.on_device[i][m], self.on_host[i][m] = p.meter.add(x), None
            p.dev.submit("copy_in", _traced(p, f"prefetch checkpoint {i}", "copy_in", copy))
        self.ready[i] = p.dev.record("copy_in")

    def wait(self, i: int) -> None:
        self.p.dev.wait("compute", self.ready[i])

    def pop(self, i: int, m: int) -> torch.Tensor:
        """Compute stream: the checkpoint, released from the engine's bookkeeping."""
        x = self.on_device[i][m]
        self.on_device[i][m] = None
        self.p.meter.sub(x)
        return x


def run_step(p: Pipeline, mbs: list[lt.MicroBatch], grad_scale: float):
    """Forward through every layer (the head also runs its backward), then the backward in reverse.

    Returns (loss_sum, squared gradient norm) as device scalars, after one sync at the end of the backward."""
    S, cfg, ops, L = len(p.slots), p.cfg, p.ops, p.cfg.num_layers
    M = len(mbs)
    hidden = [None] * M                         # the activation flowing forward, per micro-batch
    grads = [None] * M                          # d(activation) flowing backward, per micro-batch
    ckpt = Checkpoints(p, L, M)                 # ckpt i: input of decoder layer i (1..L)
    act_bytes = [mb.input_ids.numel() * cfg.hidden_size * p.store.compute_dtype.itemsize for mb in mbs]
    totals = {}                                 # device scalars written by compute work

    def run_layers(order: list[int], make_work, after=None) -> None:
        """The ping-pong: layer order[pos] computes from slot pos % S while the next S-1 layers stream in."""
        for pos in range(min(S - 1, len(order))):
            stream_in(p, order[pos], pos % S)
        for pos, i in enumerate(order):
            if pos + S - 1 < len(order):
                stream_in(p, order[pos + S - 1], (pos + S - 1) % S)
            w = bind(p, i, pos % S)
            compute(p, i, pos % S, make_work(i, w, pos), f"{make_work.__name__} {p.store.layouts[i].name}")
            if after is not None:
                after(i, pos)

    def forward(i, w, pos):
        def embed():
            for m, mb in enumerate(mbs):
                hidden[m] = p.meter.add(lt.embed_forward(w, mb))

        def decoder():
            for m, mb in enumerate(mbs):
                x = hidden[m]
                hidden[m] = p.meter.add(lt.decoder_forward(ops, cfg, w, x, mb))
                p.meter.sub(x)

        def head():
            g = p.store.layouts[i].views(p.head_acc)
            if cfg.tie_word_embeddings:
                g["lm_head"] = p.store.layouts[0].views(p.embed_acc)["embed"]
            p.head_acc.zero_()
            p.embed_acc.zero_()
            loss = torch.zeros((), dtype=torch.float32, device=p.head_acc.device)
            for m, mb in enumerate(mbs):
                loss_m, dx = lt.head_forward_backward(ops, cfg, w, g, hidden[m], mb, grad_scale)
                loss += loss_m
                p.meter.sub(hidden[m])
                hidden[m], grads[m] = None, p.meter.add(dx)
            totals["loss"] = loss
            totals["sq_head"] = _sq_norm(p.head_acc)
        return embed if i == 0 else head if i == p.head else decoder

    def save_checkpoint(i, pos):
        if i < L:                                # layer i's output is decoder layer i+1's input
            ckpt.save(i + 1, hidden, act_bytes)

    def backward(i, w, pos):
        acc = p.accs[pos % 2][:p.store.layouts[i].numel]
        g = p.store.layouts[i].views(acc)
        if i > 1:
            ckpt.prefetch(i - 1)                 # one layer ahead of the backward
        ckpt.wait(i)
        p.dev.wait("compute", p.acc_free[pos % 2])   # its previous layer's gradient has left the device

        def decoder():
            acc.zero_()
            for m, mb in enumerate(mbs):
                dx = lt.decoder_backward(ops, cfg, w, g, ckpt.pop(i, m), mb, grads[m])
                p.meter.sub(grads[m])
                grads[m] = p.meter.add(dx)
            totals[f"sq_{i}"] = _sq_norm(acc)
        return decoder

    def gradient_out(i, pos):
        p.acc_free[pos % 2] = stream_out(p, i, p.accs[pos % 2][:p.store.layouts[i].numel])

    def embed_backward():
        g = p.store.layouts[0].views(p.embed_acc)
        for m, mb in enumerate(mbs):
            lt.embed_backward(g, mb, grads[m])
            p.meter.sub(grads[m])
            grads[m] = None
        totals["sq_0"] = _sq_norm(p.embed_acc)

    run_layers(list(range(p.head + 1)), forward, save_checkpoint)   # embed, decoders, head
    stream_out(p, p.head, p.head_acc)
    ckpt.prefetch(L)
    run_layers(list(range(L, 0, -1)), backward, gradient_out)        # decoders L..1, recomputed
    compute(p, 0, None, embed_backward, "backward embed")            # needs no weights: a scatter-add of dx
    stream_out(p, 0, p.embed_acc)

    # sync: the loss and the gradient norm are needed on the host to clip and to report
    p.dev.sync(p.dev.record("compute"))
    p.dev.sync(p.dev.record("copy_out"))
    sq = sum(v for k, v in totals.items() if k.startswith("sq_"))
    return totals["loss"], sq
